"""Run as a script with N simulated CPU devices: prints the loss of one train step on a
fixed batch under a data x fsdp mesh (used by test_sharding.py in a subprocess, since the
device count is fixed when JAX starts)."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.train import optim, sharding
from ma2mba_jax.train.step import TrainState, make_train_step
import types


def main(data: int, fsdp: int) -> None:
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}))
  cfg = video_config("tiny", llm_vocab_size=64)
  model = VideoMa2mba(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  shardings = sharding.tree_shardings(mesh, params)
  params = jax.device_put(params, shardings)
  optim_cfg = ml_collections.ConfigDict(dict(
      lr_llm=1e-3, lr_vision=1e-4, lr_projector=1e-3, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, grad_clip=1.0, warmup_frac=0.0))
  optimizer = optim.make_optimizer(optim_cfg, 10, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={},
                     opt_state=optimizer.init(params), rng=jax.random.key(0))
  remat = types.SimpleNamespace(policy="magc", l=1, s=16, cell_saves="nothing", save_names=())
  rng = np.random.default_rng(0)
  b, t, f, k = 8, 40, 2, cfg.tokens_per_frame
  tokens = rng.integers(5, 64, (b, t)).astype(np.int32)
  vision_index = np.full((b, t), -1, np.int32)
  vision_index[:, 2:2 + f * k] = np.arange(f * k)
  batch = dict(tokens=tokens, loss_mask=rng.random((b, t)) < 0.7, vision_index=vision_index,
               segment_ids=np.ones((b, t), np.int32),
               frames=rng.integers(0, 255, (b, f, cfg.image_size, cfg.image_size, 3), np.uint8),
               frame_mask=np.ones((b, f), bool))
  step = jax.jit(make_train_step(graphdef, optimizer, remat, n_micro=2))
  state, metrics = step(state, sharding.shard_batch(mesh, batch))
  leaf = jax.tree.leaves(state.trainable)[0]
  print("RESULT " + json.dumps({"loss": float(metrics["loss"]),
                                "grad_norm": float(metrics["grad_norm"]),
                                "devices": len(jax.devices()),
                                "param_sum": float(jnp.sum(leaf))}))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
