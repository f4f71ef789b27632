"""Gradient accumulation: A micro-batches of m rows give the gradient (and loss) of one
micro-batch of A*m rows, the token-level mean over the whole global batch."""

import jax
import numpy as np
import optax
from flax import nnx

from configs import stage1
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.train import trainer
from ma2mba_jax.train.step import TrainState, make_train_step


def test_micro_batches_give_the_gradient_of_one_batch(demo_data):
  c = stage1.get_config("demo")
  c.data.synthetic_dir = demo_data
  c.data.max_tokens = 96
  c.data.max_frames = 4
  c.optim.global_batch = 4
  c.remat.policy = "none"
  tokenizer = load_tokenizer(trainer.tokenizer_path(c))
  model_cfg = trainer.build_model_config(c, vocab_size(tokenizer))
  batch = next(iter(make_pipeline(trainer.data_settings(c, model_cfg), tokenizer=tokenizer)))
  # Rows with different numbers of target tokens: a mean of per-micro-batch means, or a sum
  # divided by the number of micro-batches, would weigh them wrongly.
  targets_per_row = (batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] > 0)).sum(1)
  assert len(set(targets_per_row.tolist())) > 1, targets_per_row

  graphdef, params = nnx.split(VideoMa2mba(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  # Plain SGD with lr 1: the update is minus the gradient, scale included (Adam's first step
  # would normalise a wrongly scaled gradient away).
  optimizer = optax.sgd(1.0)
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), trainable=params, frozen={},
                     opt_state=optimizer.init(params), rng=jax.random.key(0))
  remat_cfg = trainer.resolved_remat(c, model_cfg)

  def gradient_and_metrics(n_micro):
    new, metrics = jax.jit(make_train_step(graphdef, optimizer, remat_cfg, n_micro))(
        state, batch)
    grads = jax.tree.map(lambda before, after: np.asarray(before) - np.asarray(after),
                         params, new.trainable)
    return grads, jax.device_get(metrics)

  whole, whole_metrics = gradient_and_metrics(1)
  assert whole_metrics["target_tokens"] == targets_per_row.sum()
  grads, metrics = gradient_and_metrics(2)   # 2 micro-batches of 2 rows
  np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, whole)
