"""`python -m ma2mba_jax.main`: the documented command works as written (workdir default,
no data named in one message), and user errors end in one line naming the field or file,
without a traceback and without writing anything."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(args, cwd):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ma2mba_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def error_lines(result):
  return [line for line in result.stderr.splitlines() if line.strip()]


def test_stage_config_without_data_says_what_to_give(tmp_path):
  result = run_main([f"--config={ROOT}/configs/stage2.py"], cwd=tmp_path)
  assert result.returncode == 1
  assert "workdir: runs/stage2" in result.stdout          # the default, printed
  lines = error_lines(result)
  assert len(lines) == 1, result.stderr
  for needed in ("config.data.synthetic_dir", "config.data.sources", "config.data.tokenizer",
                 "configs/stage2.py:demo", "python -m ma2mba_jax.data.synthetic --out"):
    assert needed in lines[0]
  assert os.listdir(tmp_path) == []                      # nothing written, not even runs/


def test_config_path_works_from_any_directory(tmp_path):
  """An installed package, run outside the repository: configs/ is not importable from the
  cwd, so the config file's own `from configs import common` needs main to find its root."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  probe = subprocess.run([sys.executable, "-c", "import ma2mba_jax"], cwd=tmp_path, env=env,
                         capture_output=True)
  if probe.returncode != 0:
    pytest.skip("ma2mba_jax is not installed in this interpreter (only on PYTHONPATH)")
  assert subprocess.run([sys.executable, "-c", "import configs"], cwd=tmp_path, env=env,
                        capture_output=True).returncode != 0
  result = subprocess.run([sys.executable, "-m", "ma2mba_jax.main",
                           f"--config={ROOT}/configs/stage2.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert "no training data" in error_lines(result)[-1], result.stderr


@pytest.mark.parametrize("args,named", [
    (["--config=configs/stage9.py"], "configs/stage9.py"),
    (["--config=configs/stage2.py:demo", "--config.optim.bogus=1"],
     "config.optim has no field 'bogus'"),
    (["--config=configs/stage2.py:demo", "--config.ckpt.max_to_keep=0"],
     "config.ckpt.max_to_keep=0"),
])
def test_user_errors_end_in_one_line(tmp_path, args, named):
  args = [a.replace("configs/", f"{ROOT}/configs/") for a in args]
  result = run_main([*args, f"--workdir={tmp_path}/run"], cwd=tmp_path)
  assert result.returncode != 0
  lines = error_lines(result)
  assert len(lines) <= 2 and named in lines[-1], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_verbosity_1_shows_the_traceback(tmp_path):
  result = run_main([f"--config={ROOT}/configs/stage2.py", f"--workdir={tmp_path}/run",
                     "--verbosity=1"], cwd=tmp_path)
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "ConfigError" in result.stderr
