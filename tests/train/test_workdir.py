"""A workdir remembers the config and the init_from export that made it: a rerun with other
settings stops naming them (before anything is written), unless they are allowed."""

import json
import os

import pytest

from configs import stage1, stage2
from ma2mba_jax import demo
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.train import trainer, workdir as workdir_lib
from ma2mba_jax.errors import ConfigError, WorkdirConflictError


def demo_config(data_dir, module=stage1):
  c = module.get_config("demo")
  c.data.synthetic_dir = data_dir
  return c


def fake_run(workdir, config, steps_saved=(3,)):
  """A workdir as a run of `config` leaves it: config.json, inputs.json, checkpoints."""
  workdir_lib.remember(config, str(workdir))
  for step in steps_saved:
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  return str(workdir)


def fake_export(directory, mtime_ns):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, model_io.CONFIG_FILE)
  with open(path, "w") as f:
    json.dump({"format_version": 1}, f)
  os.utime(path, ns=(mtime_ns, mtime_ns))
  return str(directory)


def changed_fields(config, workdir):
  return [c.split(":")[0] for c in workdir_lib.changes(config, workdir)]


def test_same_config_and_free_fields_pass(demo_data, tmp_path):
  workdir = fake_run(tmp_path / "run", demo_config(demo_data))
  c = demo_config(demo_data)
  assert workdir_lib.changes(c, workdir) == []
  c.train.steps += 10             # may grow
  c.train.log_every = 1
  c.ckpt.every_steps = 7
  c.ckpt.max_to_keep = 1
  c.eval.batches = 0
  c.remat.policy = "none"
  assert workdir_lib.changes(c, workdir) == []


def test_other_settings_are_named(demo_data, tmp_path):
  workdir = fake_run(tmp_path / "run", demo_config(demo_data))
  c = demo_config(demo_data)
  c.optim.lr_llm = 1.0
  c.seed = 5
  c.data.max_tokens = 64
  assert changed_fields(c, workdir) == ["data.max_tokens", "optim.lr_llm", "seed"]
  c = demo_config(demo_data)
  c.train.steps -= 1
  assert changed_fields(c, workdir) == ["train.steps"]
  assert "stage" in changed_fields(demo_config(demo_data, stage2), workdir)


def test_allow_changes_lets_named_fields_and_sections_through(demo_data, tmp_path):
  workdir = fake_run(tmp_path / "run", demo_config(demo_data))
  c = demo_config(demo_data)
  c.optim.lr_llm = 1.0
  c.optim.b1 = 0.5
  c.seed = 5
  c.train.allow_changes = "optim.lr_llm,seed"
  assert changed_fields(c, workdir) == ["optim.b1"]
  c.train.allow_changes = "optim, seed"
  assert changed_fields(c, workdir) == []


def test_a_workdir_without_state_is_not_compared(demo_data, tmp_path):
  workdir = fake_run(tmp_path / "run", demo_config(demo_data), steps_saved=())
  c = demo_config(demo_data)
  c.optim.lr_llm = 1.0
  assert workdir_lib.changes(c, workdir) == []


def test_a_rewritten_init_from_export_is_named(demo_data, tmp_path):
  source = tmp_path / "stage1"
  fake_export(source / "model", mtime_ns=10**18)
  c = demo_config(demo_data, stage2)
  c.init_from = str(source)
  workdir = fake_run(tmp_path / "stage2", c)
  assert workdir_lib.changes(c, workdir) == []
  fake_export(source / "model", mtime_ns=2 * 10**18)   # stage 1 trained further, re-exported
  assert changed_fields(c, workdir) == ["init_from"]
  with pytest.raises(WorkdirConflictError, match="allow_changes=init_from"):
    workdir_lib.check(c, workdir)
  c.train.allow_changes = "init_from"
  assert workdir_lib.changes(c, workdir) == []


def test_demo_restarts_a_stage_whose_input_changed(demo_data, tmp_path):
  source = tmp_path / "stage1"
  fake_export(source / "model", mtime_ns=10**18)
  c = demo_config(demo_data, stage2)
  c.init_from = str(source)
  workdir = fake_run(tmp_path / "stage2", c)
  assert not demo.restart_if_changed(c, workdir)
  assert os.path.isdir(workdir)
  fake_export(source / "model", mtime_ns=2 * 10**18)
  assert demo.restart_if_changed(c, workdir)
  assert not os.path.exists(workdir)
  assert os.path.isdir(os.path.join(tmp_path, "stage2.old", "checkpoints", "3"))


def snapshot(directory):
  """{relative path: bytes} of every file under directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_trainer_stops_on_a_conflict_before_writing(demo_data, tmp_path):
  workdir = fake_run(tmp_path / "run", demo_config(demo_data))
  before = snapshot(workdir)
  c = demo_config(demo_data)
  c.optim.lr_llm = 1.0
  with pytest.raises(WorkdirConflictError, match=r"optim\.lr_llm: 0\.003 -> 1\.0"):
    trainer.train_and_evaluate(c, workdir)
  assert snapshot(workdir) == before


@pytest.mark.parametrize("field,value,error", [
    ("data.tokenizer", "/nonexistent/tokenizer.json", "tokenizer file not found"),
    ("init_from", "/nonexistent/stage1", "config.init_from='/nonexistent/stage1'"),
    ("data.synthetic_dir", "/nonexistent/data", "holds no synthetic dataset"),
])
def test_bad_inputs_stop_before_anything_is_written(demo_data, tmp_path, field, value, error):
  c = demo_config(demo_data)
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=error):
    trainer.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_no_data_says_what_to_give(tmp_path):
  c = stage2.get_config(None)
  with pytest.raises(ConfigError) as error:
    trainer.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(error.value)
  for needed in ("config.data.synthetic_dir", "config.data.sources", "config.data.tokenizer",
                 "configs/stage2.py:demo", "python -m ma2mba_jax.data.synthetic --out"):
    assert needed in message
  assert not (tmp_path / "run").exists()
