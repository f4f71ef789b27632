"""One train step on 4 simulated CPU devices under each layout (data parallel, ZeRO-1,
data x FSDP) gives the loss, grad norm and parameters of one device, and leaves every
parameter and optimizer-state array with the layout's sharding and bytes per device."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# data, fsdp, zero1
ONE, DP, ZERO1, FSDP = "1,1,0", "4,1,0", "4,1,1", "2,2,0"
# The tiny model's arrays of at least 2^14 elements (sharding.MIN_SHARD_SIZE), the only ones
# split: their spec under each layout, the sharded axis named.
BIG = {"['in_proj']['kernel']": 2, "['out_proj']['kernel']": 1}   # (2, 64, 296), (2, 128, 64)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                       "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-m", "tests.train.multi_device_step", ONE, DP, ZERO1,
                         FSDP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
          if l.startswith("RESULT ")]
  return {",".join(map(str, r["layout"])): r for r in rows}


def expected_spec(path: str, shape: list[int], axis_name) -> str:
  """`P()` or the big array's spec with `axis_name` on its sharded axis."""
  for suffix, axis in BIG.items():
    if path.endswith(suffix) and axis_name is not None and len(shape) == 3:
      spec = [None] * 3
      spec[axis] = axis_name
      return str(P(*spec))
  return str(P())


def check_tree(row: dict, kind: str, axis_name, n_shards: int) -> None:
  """Every leaf of `kind` (param / opt) has its expected spec, and each device holds the
  bytes those specs imply."""
  shapes, specs = row[f"{kind}_shapes"], row[f"{kind}_specs"]
  expected_bytes = 0
  n_big = 0
  for path, (shape, itemsize) in shapes.items():
    want = expected_spec(path, shape, axis_name)
    assert specs[path] == want, (row["layout"], kind, path)
    split = want != str(P())
    n_big += split
    expected_bytes += math.prod(shape) * itemsize // (n_shards if split else 1)
  if axis_name is not None:
    # params: 2 big arrays; optimizer: their Adam mu and nu.
    assert n_big == (2 if kind == "param" else 4), (row["layout"], kind)
  assert row[f"{kind}_bytes"] == [expected_bytes] * row["devices"], (row["layout"], kind)


def test_every_layout_matches_one_device(results):
  one = results[ONE]
  assert one["devices"] == 1
  for layout in (DP, ZERO1, FSDP):
    row = results[layout]
    assert row["devices"] == 4
    np.testing.assert_allclose(row["loss"], one["loss"], rtol=1e-5, err_msg=layout)
    np.testing.assert_allclose(row["grad_norm"], one["grad_norm"], rtol=1e-4, err_msg=layout)
    # Sums of |p| are well conditioned, but Adam's first step moves a parameter whose
    # gradient is about eps by an amount that rounding decides: hence atol.
    np.testing.assert_allclose(row["param_abs_sums"], one["param_abs_sums"], rtol=1e-5,
                               atol=1e-4, err_msg=layout)
    np.testing.assert_allclose(row["param_sums"], one["param_sums"], atol=1e-4, err_msg=layout)


def test_data_parallel_replicates_everything(results):
  check_tree(results[DP], "param", None, 1)
  check_tree(results[DP], "opt", None, 1)


def test_zero1_replicates_params_and_splits_optimizer_state_over_data(results):
  check_tree(results[ZERO1], "param", None, 1)
  check_tree(results[ZERO1], "opt", "data", 4)
  assert results[ZERO1]["opt_bytes"][0] < 0.7 * results[DP]["opt_bytes"][0]


def test_fsdp_splits_params_and_optimizer_state(results):
  check_tree(results[FSDP], "param", "fsdp", 2)
  check_tree(results[FSDP], "opt", "fsdp", 2)
  assert results[FSDP]["param_bytes"][0] < 0.8 * results[DP]["param_bytes"][0]
