"""End to end: train_and_evaluate on the tiny config. Stopped and resumed exactly (on data
whose batches differ at every step), started from another stage's export, stopped on a
non-finite loss at a finite checkpoint, and its validation loss against a direct one."""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import stage1, stage3
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.train import checkpoint, trainer
from ma2mba_jax.errors import NonFiniteLossError


def tiny_config(data_dir, module=stage1, steps=4, remat="magc"):
  """Stage 1 of the demo, smaller: 2 rows a step from the tiny set's 9 images and clips, so
  the first 4 steps (8 rows of one shuffled epoch) all see different samples."""
  c = module.get_config("demo")
  c.data.synthetic_dir = data_dir
  c.data.max_tokens = 96
  c.data.max_frames = 4
  c.optim.global_batch = 2
  c.optim.micro_batch = 1           # two micro-batches: gradient accumulation is exercised
  c.remat.policy = remat
  c.train.steps = steps
  c.train.log_every = 1
  c.ckpt.every_steps = 100
  c.eval.batches = 0
  return c


def exported_params(workdir):
  model = model_io.restore_model(os.path.join(workdir, trainer.MODEL_EXPORT))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def checkpoint_params(workdir, step):
  """The params of checkpoint `step`, as numpy (restored without a target)."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                  item_names=checkpoint.ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  manager.close()
  return restored["params"]


def logged(workdir, key="loss"):
  """{step: value} of `key` in workdir/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r[key] for r in records if key in r}


def first_batches(config, n):
  tokenizer = load_tokenizer(trainer.tokenizer_path(config))
  model_cfg = trainer.build_model_config(config, vocab_size(tokenizer))
  batches = iter(make_pipeline(trainer.data_settings(config, model_cfg), tokenizer=tokenizer))
  return [next(batches) for _ in range(n)]


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def straight_run(demo_data, tmp_path_factory):
  """An uninterrupted 4-step run: (workdir, returned metrics)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, trainer.train_and_evaluate(tiny_config(demo_data), workdir)


def test_stop_and_resume_reaches_the_same_parameters(demo_data, straight_run, tmp_path):
  straight, last = straight_run
  # The data gives a different batch at every step: a resume that restarted the data
  # iterator would train steps 3 and 4 on the batches of steps 1 and 2.
  batches = first_batches(tiny_config(demo_data), 4)
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.array_equal(batches[i]["tokens"], batches[j]["tokens"]), (i, j)

  resumed = str(tmp_path / "resumed")
  c = tiny_config(demo_data)
  c.train.stop_at_step = 2
  trainer.train_and_evaluate(c, resumed)
  assert not os.path.exists(os.path.join(resumed, trainer.MODEL_EXPORT))
  c.train.stop_at_step = 0
  last_resumed = trainer.train_and_evaluate(c, resumed)   # picks up at step 2

  straight_losses, resumed_losses = logged(straight), logged(resumed)
  assert sorted(resumed_losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([resumed_losses[s] for s in range(1, 5)],
                             [straight_losses[s] for s in range(1, 5)], rtol=1e-6)
  np.testing.assert_allclose(last_resumed["loss"], last["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-6, atol=1e-7),
               exported_params(resumed), exported_params(straight))


def test_init_from_starts_from_the_exported_parameters(demo_data, straight_run, tmp_path):
  source, _ = straight_run
  c = tiny_config(demo_data, steps=2, remat="none")
  c.seed = 1                      # another random init: only init_from can give the source's
  c.init_from = source
  # Warmup over the first step: its learning rate is 0, so the state saved after step 1
  # holds exactly the parameters the stage started from.
  c.optim.warmup_frac = 0.5
  c.train.stop_at_step = 1
  workdir = str(tmp_path / "next_stage")
  trainer.train_and_evaluate(c, workdir)
  started_from = checkpoint_params(workdir, 1)
  assert_trees_equal(started_from, exported_params(source))


def test_non_finite_loss_stops_at_a_finite_checkpoint_that_resumes(demo_data, tmp_path):
  workdir = str(tmp_path / "diverging")
  c = tiny_config(demo_data, steps=8, remat="none")
  for name in ("lr_llm", "lr_vision", "lr_projector"):
    c.optim[name] = 1e6
  c.optim.warmup_frac = 0.25      # lr 0 at the first step: checkpoint 1 holds the init
  c.train.log_every = 100         # the loss is checked at every step, not only when logged
  c.ckpt.every_steps = 1
  with pytest.raises(NonFiniteLossError) as stop:
    trainer.train_and_evaluate(c, workdir)
  message = str(stop.value)
  bad = int(re.search(r"at step (\d+), the first non-finite step", message).group(1))
  newest = int(re.search(r"newest checkpoint, step (\d+) ", message).group(1))
  assert newest < bad
  assert checkpoint.latest_saved_step(workdir) == newest   # nothing later was saved
  params = checkpoint_params(workdir, newest)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))

  # As the message says: a sane learning rate, the change allowed, the same workdir.
  for name in ("lr_llm", "lr_vision", "lr_projector"):
    c.optim[name] = 1e-3
  c.train.allow_changes = "optim"
  last = trainer.train_and_evaluate(c, workdir)
  assert np.isfinite(last["loss"])
  losses = logged(workdir)
  assert max(losses) == 8 and all(np.isfinite(losses[s]) for s in losses if s > newest)
  assert all(np.isfinite(np.asarray(a)).all()
             for a in jax.tree.leaves(exported_params(workdir)))


def direct_val_loss(model, batches):
  """Token cross-entropy of the model's full logits, position t predicting token t+1 where
  the data marks t+1 as a target, in float64 numpy."""
  total, count = 0.0, 0.0
  for b in batches:
    logits = np.asarray(model(b["tokens"], b["vision_index"], b["frames"], b["frame_mask"]),
                        np.float64)                                  # [B, T, V]
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target = b["tokens"][:, 1:]
    weight = (b["loss_mask"][:, 1:] * (b["segment_ids"][:, 1:] > 0)).astype(np.float64)
    picked = np.take_along_axis(log_p[:, :-1], target[..., None], axis=-1)[..., 0]
    total += float(-(picked * weight).sum())
    count += float(weight.sum())
  return total / count, count


def test_validation_loss_matches_a_direct_computation(demo_data, tmp_path):
  workdir = str(tmp_path / "stage3")
  c = tiny_config(demo_data, module=stage3, steps=2, remat="none")
  c.data.qa_per_sample = 2          # two QA pairs a sample: the val split has > 2 batches
  c.eval.batches = 2
  c.eval.every_steps = 1            # and once per step during training
  last = trainer.train_and_evaluate(c, workdir)
  assert set(logged(workdir, "val_loss")) == {1, 2}

  settings = trainer.data_settings(c, trainer.build_model_config(
      c, vocab_size(load_tokenizer(trainer.tokenizer_path(c)))))
  settings["batch_size"] = c.optim.micro_batch
  val = make_pipeline(settings, tokenizer=load_tokenizer(trainer.tokenizer_path(c)),
                      split="val")
  batches = [b for _, b in zip(range(c.eval.batches + 1), val)]
  assert len(batches) == c.eval.batches + 1   # more than eval.batches: only those count
  batches = batches[:c.eval.batches]
  # Batches with different numbers of targets: a mean of per-batch means would differ.
  targets = [(b["loss_mask"][:, 1:] * (b["segment_ids"][:, 1:] > 0)).sum() for b in batches]
  assert len(set(targets)) == len(targets), targets
  model = model_io.restore_model(os.path.join(workdir, trainer.MODEL_EXPORT))
  loss, count = direct_val_loss(model, batches)
  assert last["val_tokens"] == count
  np.testing.assert_allclose(last["val_loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(logged(workdir, "val_loss")[2], loss, rtol=1e-5)


def test_a_finished_stage_keeps_its_export_until_it_trains_further(demo_data, straight_run,
                                                                   tmp_path):
  """What the demo's stage chaining relies on: rerunning a finished stage leaves its export
  alone (the next stage resumes), training it further writes a new one (the next stage's
  workdir then names init_from as changed)."""
  import shutil

  from ma2mba_jax.train import workdir as workdir_lib
  source = str(tmp_path / "stage1")
  shutil.copytree(straight_run[0], source)
  export = os.path.join(source, trainer.MODEL_EXPORT)
  identity = workdir_lib.export_identity(export)
  assert trainer.train_and_evaluate(tiny_config(demo_data), source) == {}
  assert workdir_lib.export_identity(export) == identity

  following = tiny_config(demo_data, module=stage3)
  following.init_from = source
  next_dir = str(tmp_path / "stage3")
  workdir_lib.remember(following, next_dir)
  os.makedirs(os.path.join(next_dir, "checkpoints", "1"))   # as if it had trained a step
  assert workdir_lib.changes(following, next_dir) == []

  trainer.train_and_evaluate(tiny_config(demo_data, steps=5), source)   # steps may grow
  assert max(logged(source)) == 5
  assert workdir_lib.export_identity(export) != identity
  assert [c.split(":")[0] for c in workdir_lib.changes(following, next_dir)] == ["init_from"]
