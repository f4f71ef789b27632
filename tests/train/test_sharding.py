"""A train step on 4 simulated CPU devices (data and FSDP axes) gives the loss of one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_step(n_devices: int, data: int, fsdp: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
  proc = subprocess.run([sys.executable, "-m", "tests.train.multi_device_step", str(data),
                         str(fsdp)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_four_devices_data_and_fsdp_match_one_device():
  one = run_step(1, 1, 1)
  four = run_step(4, 2, 2)
  assert four["devices"] == 4 and one["devices"] == 1
  np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
  np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(four["param_sum"], one["param_sum"], rtol=1e-5)
