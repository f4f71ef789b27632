"""End to end: train_and_evaluate on the tiny config, stopped and resumed exactly."""

import os

import jax
import numpy as np

from configs import stage2
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.train import trainer


def tiny_config(data_dir, steps=4):
  c = stage2.get_config("demo")
  c.data.synthetic_dir = data_dir
  c.data.max_tokens = 96
  c.data.max_frames = 4
  c.optim.global_batch = 2
  c.optim.micro_batch = 1           # two micro-batches: gradient accumulation is exercised
  c.train.steps = steps
  c.train.log_every = 1
  c.ckpt.every_steps = 100
  c.eval.batches = 0
  return c


def exported_params(workdir):
  model = model_io.restore_model(os.path.join(workdir, trainer.MODEL_EXPORT))
  from flax import nnx
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_stop_and_resume_reaches_the_same_parameters(demo_data, tmp_path):
  straight = str(tmp_path / "straight")
  last = trainer.train_and_evaluate(tiny_config(demo_data), straight)

  resumed = str(tmp_path / "resumed")
  c = tiny_config(demo_data)
  c.train.stop_at_step = 2
  trainer.train_and_evaluate(c, resumed)
  assert not os.path.exists(os.path.join(resumed, trainer.MODEL_EXPORT))
  c.train.stop_at_step = 0
  last_resumed = trainer.train_and_evaluate(c, resumed)   # picks up at step 2

  np.testing.assert_allclose(last_resumed["loss"], last["loss"], rtol=1e-6)
  for a, b in zip(exported_params(resumed), exported_params(straight), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # Metrics were logged in both runs.
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
  assert steps == [1, 2, 3, 4]
