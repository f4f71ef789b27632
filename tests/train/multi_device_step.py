"""Run as a script with N simulated CPU devices: one train step on a fixed batch under each
mesh layout given on the command line, printing per layout the loss, the grad norm, a
checksum of the parameters, every leaf's PartitionSpec and the bytes each device holds (used
by test_sharding.py in a subprocess, since the device count is fixed when JAX starts).

  python -m tests.train.multi_device_step 1,1,0 4,1,0 4,1,1 1,4,0      # data,fsdp,zero1
"""

import json
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.train import optim, sharding
from ma2mba_jax.train.step import TrainState, make_train_step


def _bytes_per_device(tree, devices) -> list[int]:
  """Bytes of `tree`'s arrays resident on each device."""
  held = {d: 0 for d in devices}
  for a in jax.tree.leaves(tree):
    for shard in a.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return [held[d] for d in devices]


def _specs(tree) -> dict[str, str]:
  return {jax.tree_util.keystr(path): str(a.sharding.spec)
          for path, a in jax.tree_util.tree_leaves_with_path(tree)}


def run_layout(data: int, fsdp: int, zero1: bool) -> dict:
  devices = jax.devices()[:data * fsdp]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}), devices)
  cfg = video_config("tiny", llm_vocab_size=64)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract)
  optim_cfg = ml_collections.ConfigDict(dict(
      lr_llm=1e-3, lr_vision=1e-4, lr_projector=1e-3, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, grad_clip=1.0, warmup_frac=0.0))
  optimizer = optim.make_optimizer(optim_cfg, 10, abstract_params)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  param_shardings, opt_shardings = sharding.layout_shardings(mesh, abstract_params,
                                                             abstract_opt, zero1=zero1)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(VideoMa2mba(cfg, rngs=nnx.Rngs(0)),
                                                      nnx.Param)),
                   out_shardings=param_shardings)()
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  replicated = sharding.replicated(mesh)
  state_shardings = TrainState(step=replicated, trainable=param_shardings, frozen={},
                               opt_state=opt_shardings, rng=replicated)
  state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                                    frozen={}, opt_state=opt_state, rng=jax.random.key(0)),
                         state_shardings)
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
  # Micro-batches of 4 rows: 2 accumulation steps whatever the layout.
  step = jax.jit(make_train_step(graphdef, optimizer, remat, n_micro=2, mesh=mesh),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  batch = sharding.shard_batch(mesh, batch)
  with jax.transfer_guard("disallow"):
    state, metrics = step(state, batch)
  return {"layout": [data, fsdp, int(zero1)], "devices": len(devices),
          "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
          "param_sums": [float(np.sum(np.asarray(a, np.float64)))
                         for a in jax.tree.leaves(state.trainable)],
          "param_abs_sums": [float(np.sum(np.abs(np.asarray(a, np.float64))))
                             for a in jax.tree.leaves(state.trainable)],
          "param_specs": _specs(state.trainable), "opt_specs": _specs(state.opt_state),
          "param_shapes": {jax.tree_util.keystr(p): [list(a.shape), a.dtype.itemsize]
                           for p, a in jax.tree_util.tree_leaves_with_path(state.trainable)},
          "opt_shapes": {jax.tree_util.keystr(p): [list(a.shape), a.dtype.itemsize]
                         for p, a in jax.tree_util.tree_leaves_with_path(state.opt_state)},
          "param_bytes": _bytes_per_device(state.trainable, devices),
          "opt_bytes": _bytes_per_device(state.opt_state, devices)}


if __name__ == "__main__":
  for arg in sys.argv[1:]:
    data, fsdp, zero1 = map(int, arg.split(","))
    print("RESULT " + json.dumps(run_layout(data, fsdp, bool(zero1))), flush=True)
