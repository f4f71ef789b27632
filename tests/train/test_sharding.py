"""One train step on 8 simulated CPU devices under each layout, in ONE subprocess: FSDP and
the sequence axis, alone and combined with data parallel and ZeRO-1 (data 2 x fsdp 2 x seq 2
with ZeRO-1), per-layer remat and MA-GC (time blocks inside each piece: the wavefront
pipeline), packed rows with segment boundaries at and near a piece boundary. Each gives the loss, the gradients (per leaf: sum of squares and a random
projection), the updated parameters and the eval step's loss of one device, and leaves
every parameter and optimizer-state array with the layout's sharding and bytes per
device. Data parallel and ZeRO-1 alone run through the real trainer in
test_multi_device_trainer.py."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# name: "data,fsdp,zero1,seq,remat policy,packed" (tests/train/multi_device_step.py)
# magc:1:S: MA-GC with l=1 (the tiny model's 2 layers: 2 groups) and time blocks of S
# tokens, 2 per piece under seq: the wavefront pipeline over the pieces (remat/pipeline.py).
# MA-GC with one block per piece runs in test_multi_device_trainer.py's data2 x fsdp2 x seq2.
LAYOUTS = {
    "one": "1,1,0,1,magc,0",
    "fsdp": "2,2,0,1,magc,0",               # XLA-partitioned FSDP
    "data_seq": "2,1,0,4,layer,0",          # plain data parallel x 4 sequence pieces
    "all": "2,2,1,2,magc:1:10,0",           # data x fsdp x seq with ZeRO-1, 8 devices
    "one_packed": "1,1,0,1,magc,1",
    "fsdp_seq_packed": "1,2,0,4,magc:1:5,1",  # resets at and near the piece boundaries
}
REFERENCE = {"fsdp": "one", "data_seq": "one", "all": "one",
             "fsdp_seq_packed": "one_packed"}
COMPARED = tuple(REFERENCE)
# ZeRO-1 over data alone (the shard_map data-parallel step) is checked through the real
# trainer in test_multi_device_trainer.py (losses, grad norms, parameters, bytes held).
# Worst relative errors over 20 seeds, any layout (python -m tests.train.sharding_sweep
# --seeds=20, 2026-11-26, with the wavefront layouts "all" and "fsdp_seq_packed"): loss
# 2.3e-7, eval loss 2.4e-7, grad norm 1.2e-7, per-leaf gradient sum of squares 2.7e-6
# ("all"), per-leaf random projection 3.4e-6 ("all", "fsdp_seq_packed"); updated
# parameters: sums of |p| at most 0.11 of (rtol 1e-5, atol 1e-4), sums of p within 4.0e-5
# ("fsdp_seq_packed"). Tolerances: about 10x.
TOL = {"loss": 3e-6, "eval_loss": 3e-6, "grad_norm": 2e-6, "grad_ssq": 3e-5,
       "grad_dot": 4e-5}
PARAM_SUM_ATOL = 4e-4
# The tiny model's arrays of at least 2^14 elements (sharding.MIN_SHARD_SIZE), the only ones
# split: their spec under each layout, the sharded axis named.
BIG = {"['in_proj']['kernel']": 2, "['out_proj']['kernel']": 1}   # (2, 64, 296), (2, 128, 64)


def env_8_devices() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0")


# The ViT's attention key bias gets no gradient in exact arithmetic (softmax ignores a shift
# common to every key): its computed gradient is rounding noise (~1e-10), left out.
NO_GRADIENT = ("['attn']['k']['bias']",)


def quantities(row: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (values, scale)}: what is compared, and the size an error is relative to."""
  leaves = sorted(k for k in row["grads"] if not k.endswith(NO_GRADIENT))
  ssq = np.array([row["grads"][k][0] for k in leaves])
  dot = np.array([row["grads"][k][1] for k in leaves])
  out = {"loss": (np.array([row["loss"]]), np.abs(np.array([row["loss"]]))),
         "grad_norm": (np.array([row["grad_norm"]]), np.array([row["grad_norm"]])),
         "grad_ssq": (ssq, ssq),
         # a projection on a random direction is about +-sqrt(ssq) in size
         "grad_dot": (dot, np.sqrt(ssq))}
  if row["eval_loss"] is not None:
    out["eval_loss"] = (np.array([row["eval_loss"]]), np.abs(np.array([row["eval_loss"]])))
  return out


def rel_errors(row: dict, reference: dict) -> dict[str, float]:
  got, want = quantities(row), quantities(reference)
  return {k: float(np.max(np.abs(got[k][0] - want[k][0]) / np.maximum(want[k][1], 1e-30)))
          for k in got}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
  proc = subprocess.run([sys.executable, "-m", "tests.train.multi_device_step",
                         *LAYOUTS.values(), "pipeline"], cwd=ROOT, env=env_8_devices(),
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
          if l.startswith("RESULT ")]
  by_layout = {",".join(map(str, r["layout"])): r for r in rows if "layout" in r}
  out = {name: by_layout[layout] for name, layout in LAYOUTS.items()}
  out["pipeline"] = next(r["pipeline"] for r in rows if "pipeline" in r)
  out["pipeline_memory"] = next(r["pipeline_memory"] for r in rows if "pipeline_memory" in r)
  out["pipeline_growth"] = next(r["pipeline_growth"] for r in rows if "pipeline_growth" in r)
  return out


# The toy wavefront (tests/remat/pipeline_check.py: 5 layers in groups of 2 and 1, 4 pieces,
# blocks of 5 with a shorter last one, nonzero initial states) against one-device MA-GC:
# worst over seeds 0-19 (2026-11-26), outputs and every gradient but the parameters' 0,
# parameter gradients 2.3e-7 (relative to the largest entry). Tolerance: about 10x.
PIPELINE_TOL = 3e-6


def test_magc_wavefront_keeps_no_per_tick_copy_of_the_group_parameters(results):
  # pipeline_check.temp_bytes: 5.10 MB of temp for 2.10 MB of weights with the tick
  # checkpoint, 8.87 MB when each tick's parameter slice was saved (7/4 of the weights more).
  mem = results["pipeline_memory"]
  assert mem["temp_bytes"] < 2.9 * mem["weight_bytes"], mem


def test_magc_wavefront_checkpoints_are_what_the_memory_model_counts(results):
  # pipeline_check.checkpoint_growth: the compiled temp memory from 2 to 8 devices at the
  # same piece grows by the 6 more ticks of stacked checkpoints that remat/planner.py counts
  # under a seq axis (2.172 vs 2.163 MB, 2026-11-27); the one-device model would say 0.
  growth = results["pipeline_growth"]
  measured, model = growth["measured_growth"], growth["model_growth"]
  assert model > 2e6 and abs(measured - model) < 0.03 * model, growth


def test_magc_wavefront_with_a_smaller_last_group_matches_one_device(results):
  errors = results["pipeline"]
  assert set(errors) == {"out_h", "out_conv", "out_ssm", "grad_params", "grad_h",
                         "grad_conv", "grad_ssm"}
  for key, err in errors.items():
    assert err < PIPELINE_TOL, (key, err)


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


@pytest.mark.parametrize("name", COMPARED)
def test_layout_matches_one_device(results, name):
  row, one = results[name], results[REFERENCE[name]]
  assert one["devices"] == 1
  layout = LAYOUTS[name].split(",")
  assert row["devices"] == int(layout[0]) * int(layout[1]) * int(layout[3])
  errors = rel_errors(row, one)
  assert ("eval_loss" in errors) == (int(layout[3]) > 1), name   # evaluated with seq only
  for key, err in errors.items():
    assert err < TOL[key], (name, key, err)
  # Sums of |p| are well conditioned, but Adam's first step moves a parameter whose
  # gradient is about eps by an amount that rounding decides: hence atol.
  np.testing.assert_allclose(row["param_abs_sums"], one["param_abs_sums"], rtol=1e-5,
                             atol=1e-4, err_msg=name)
  np.testing.assert_allclose(row["param_sums"], one["param_sums"], atol=PARAM_SUM_ATOL,
                             err_msg=name)


def test_data_parallel_and_seq_replicate_everything(results):
  check_tree(results["data_seq"], "param", None, 1)
  check_tree(results["data_seq"], "opt", None, 1)


def test_fsdp_splits_params_and_optimizer_state(results):
  check_tree(results["fsdp"], "param", "fsdp", 2)
  check_tree(results["fsdp"], "opt", "fsdp", 2)
  assert results["fsdp"]["param_bytes"][0] < 0.8 * results["data_seq"]["param_bytes"][0]
  check_tree(results["fsdp_seq_packed"], "param", "fsdp", 2)


def test_combined_layout_splits_params_over_fsdp_and_optimizer_state_over_all(results):
  row = results["all"]
  check_tree(row, "param", "fsdp", 2)
  check_tree(row, "opt", ("fsdp", "data", "seq"), 8)


def test_sequence_axis_takes_magc_time_blocks_and_refuses_pieces_shorter_than_the_halo():
  from configs import stage2
  from ma2mba_jax.models.video_presets import video_config
  from ma2mba_jax.errors import ConfigError
  from ma2mba_jax.remat import magc
  from ma2mba_jax.remat.settings import RematSettings
  from ma2mba_jax.train.trainer import check_sequence_remat, resolved_remat
  c = stage2.get_config("demo")                   # max_tokens 512, MA-GC with s auto
  model_cfg = video_config("tiny")
  c.mesh.seq = 2
  for s in ("auto", "128", "256"):                # pieces of 256 tokens
    c.remat.s = s
    assert check_sequence_remat(c, model_cfg) == 2
  c.remat.s = "auto"
  remat = resolved_remat(c, model_cfg)            # the memory model, on a piece
  assert remat.s <= 256 and remat.s % model_cfg.llm_config.chunk_len == 0
  # ... counting the wavefront's checkpoints stacked over its idle ticks (remat/planner.py),
  # which moves the tiny model's plan on 256-token pieces off the one-device one.
  auto = RematSettings(l="auto", s="auto")
  llm = model_cfg.llm_config
  assert (remat.l, remat.s) == magc.resolve(auto, llm, 256, pipeline_devices=2)[:2]
  assert (remat.l, remat.s) != magc.resolve(auto, llm, 256)[:2]
  c.data.max_tokens, c.mesh.seq = 8, 4            # pieces of 2 tokens, halo of 3
  with pytest.raises(ConfigError, match=r"config\.mesh\.seq=4: pieces of 2 tokens") as err:
    check_sequence_remat(c, model_cfg)
  assert "\n" not in str(err.value)


def test_tokens_are_padded_to_whole_pieces_as_padding():
  from ma2mba_jax.train.sharding import pad_tokens
  batch = {"tokens": np.arange(10).reshape(2, 5), "segment_ids": np.ones((2, 5), np.int32),
           "loss_mask": np.ones((2, 5), bool), "vision_index": np.zeros((2, 5), np.int32),
           "frames": np.ones((2, 3, 4, 4, 3), np.uint8)}
  out = pad_tokens(batch, 4)
  assert out["tokens"].shape == (2, 8) and out["frames"].shape == (2, 3, 4, 4, 3)
  assert (out["segment_ids"][:, 5:] == 0).all() and not out["loss_mask"][:, 5:].any()
  assert (out["vision_index"][:, 5:] == -1).all()
  np.testing.assert_array_equal(out["tokens"][:, :5], batch["tokens"])
  assert pad_tokens(batch, 5) is batch
