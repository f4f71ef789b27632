"""Sequence-parallel SSD on 8 simulated CPU devices equals the one-device SSD."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("n_seq,n_groups,with_init", [(8, 1, True), (4, 2, False)])
def test_matches_one_device(n_seq, n_groups, with_init):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "tests.kernels.sequence_parallel_check", str(n_seq),
       str(n_groups), "1" if with_init else "0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errs = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert set(errs) >= {"y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"}
  if with_init:
    assert "dinitial_state" in errs
  # tolerance_sweep.py (seeds 0..19, both configurations): worst 1.3e-06 (ddt_bias), the
  # rest below 1e-06; 2x rounded up.
  for name, err in errs.items():
    assert err < 5e-6, (name, err)
