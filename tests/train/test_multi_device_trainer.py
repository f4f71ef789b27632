"""The real trainer on 8 simulated CPU devices, its transfer guard on, in three layouts:
ZeRO-1 over data 8 (the shard_map data-parallel step: parameters whole on each device,
optimizer state split 8 ways), data 2 x fsdp 2 x seq 2 with ZeRO-1 (each sample's tokens
in two pieces, MA-GC one time block a piece: parameters split over fsdp, optimizer state
over data x fsdp x seq) and data 4 x seq 2 with ZeRO-1 and MA-GC l=1 x s=16 (two time
blocks a piece, two layer groups: the wavefront pipeline of remat/pipeline.py). Each trains
2 steps, stops, resumes from the checkpoint and trains a third, with the losses, gradient
norms and final parameters of one device. The other layouts (plain data parallel, FSDP
alone, seq with packing) are checked at the step level in test_sharding.py."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_trainer(n_devices: int, layouts: list[str], data_dir: str, tmp_path) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} "
                       f"--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-m", "tests.train.multi_device_trainer", data_dir,
                         str(tmp_path / f"runs{n_devices}"), *layouts], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
          if l.startswith("RESULT ")]
  assert [r["devices"] for r in rows] == [n_devices] * len(layouts)
  return rows


def test_zero1_and_sequence_trainer_resume_and_match_one_device(demo_data, tmp_path):
  one, = run_trainer(1, ["1,1,0,1"], demo_data, tmp_path)
  zero1, run, pipeline = run_trainer(8, ["8,1,1,1", "2,2,1,2", "4,1,1,2,16,1"], demo_data,
                                     tmp_path)
  assert one["steps"] == [1, 2, 3]
  # The losses move (warmup 0): equal losses cannot come from a step that did nothing.
  assert len(set(np.round(one["loss"], 4))) == 3
  for r in (zero1, run, pipeline):
    assert r["steps"] == [1, 2, 3], r["layout"]     # stopped at 2, resumed, logged 3
    np.testing.assert_allclose(r["loss"], one["loss"], rtol=2e-5, err_msg=str(r["layout"]))
    np.testing.assert_allclose(r["grad_norm"], one["grad_norm"], rtol=1e-4,
                               err_msg=str(r["layout"]))
    np.testing.assert_allclose(r["param_sums"], one["param_sums"], rtol=1e-4, atol=1e-4,
                               err_msg=str(r["layout"]))
  params_one, opt_one = one["held_bytes"]
  assert zero1["held_bytes"][0] == params_one and zero1["held_bytes"][1] < 0.6 * opt_one
  params_run, opt_run = run["held_bytes"]
  # The big arrays (over half the bytes) are split: parameters in 2, optimizer state in 8.
  assert params_run < 0.8 * params_one
  assert opt_run < 0.6 * opt_one and opt_run / opt_one < params_run / params_one
  assert pipeline["held_bytes"][0] == params_one and pipeline["held_bytes"][1] < 0.6 * opt_one
