"""Run as a script with N simulated CPU devices: one train step on a fixed batch under each
mesh layout given on the command line, printing per layout the loss, the grad norm, the
gradients (their sum of squares per leaf, and a projection on a fixed random direction), a
checksum of the parameters, every leaf's PartitionSpec and the bytes each device holds (used
by test_sharding.py in a subprocess, since the device count is fixed when JAX starts).

  python -m tests.train.multi_device_step 1,1,0,1,magc,0 2,2,1,2,layer,1 ... [pipeline]
      # data,fsdp,zero1,seq,remat policy,packed   [--seed=N]
      # pipeline: tests/remat/pipeline_check.py's toy wavefront against one device

remat: magc is l=1 x s=20 (T=40: two time blocks on one device, one per piece with seq 2
or 4); magc:L:S is l=L x s=S (S below the piece length: time blocks inside each piece, the
wavefront pipeline of remat/pipeline.py); layer is per-layer remat. packed: rows of three segments whose boundaries fall on,
just after and a few tokens after the middle (a piece boundary under seq 2).
"""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train import optim, sharding
from ma2mba_jax.train.step import TrainState, make_eval_step, make_train_step


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


def _grad_probe(grads) -> dict:
  """Per leaf: the sum of squares and the dot with a fixed random direction (f64)."""
  out = {}
  for i, (path, g) in enumerate(jax.tree_util.tree_leaves_with_path(grads)):
    g = np.asarray(g, np.float64)
    direction = np.random.default_rng(1000 + i).standard_normal(g.shape)
    out[jax.tree_util.keystr(path)] = [float(np.sum(g * g)), float(np.sum(g * direction))]
  return out


def run_layout(data: int, fsdp: int, zero1: bool, seq: int = 1, policy: str = "magc",
               packed: bool = False, seeds: tuple[int, ...] = (0,)):
  """Yields one result per seed (model init and batch from the seed); compiled once."""
  devices = jax.devices()[:data * fsdp * seq]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp,
                                                       "seq": seq}), devices)
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
  init_params = jax.jit(
      lambda key: nnx.to_pure_dict(nnx.state(VideoMa2mba(cfg, rngs=nnx.Rngs(key)), nnx.Param)),
      out_shardings=param_shardings)
  init_opt = jax.jit(optimizer.init, out_shardings=opt_shardings)
  replicated = sharding.replicated(mesh)
  state_shardings = TrainState(step=replicated, trainable=param_shardings, frozen={},
                               opt_state=opt_shardings, rng=replicated)
  name, l, s = (policy.split(":") + ["1", "20"])[:3]
  remat = RematSettings(policy=name, l=int(l), s=int(s))
  # Micro-batches of 4 rows: 2 accumulation steps whatever the layout. The optimizer is
  # wrapped to hand out the gradients it is given (a side output of the same trace).
  grads = {}

  def update(g, opt_state, params=None):
    grads["g"] = g
    return optimizer.update(g, opt_state, params)
  probe = optax.GradientTransformation(optimizer.init, update)
  train_step = make_train_step(graphdef, probe, remat, n_micro=2, mesh=mesh, packed=packed)

  def with_grads(state, batch):
    new_state, metrics = train_step(state, batch)
    return new_state, metrics, grads.pop("g")
  step = jax.jit(with_grads, out_shardings=(state_shardings, replicated, None),
                 donate_argnums=(0,))
  # The trainer's validation loss (the whole batch as one micro-batch, after the update), on
  # one device and with a seq axis (the other layouts run the one-device function).
  eval_step = (jax.jit(make_eval_step(graphdef, remat, packed=packed, mesh=mesh))
               if seq > 1 or len(devices) == 1 else None)
  for seed in seeds:
    params = init_params(jax.random.key(seed))
    state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                                      frozen={}, opt_state=init_opt(params),
                                      rng=jax.random.key(0)), state_shardings)
    batch = sharding.shard_batch(mesh, make_batch(cfg, seed, packed))
    with jax.transfer_guard("disallow"):
      state, metrics, step_grads = step(state, batch)
      evaluated = eval_step(state, batch) if eval_step is not None else None
    yield {"layout": [data, fsdp, int(zero1), seq, policy, int(packed)],
           "devices": len(devices), "seed": seed,
           "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
           "eval_loss": (float(evaluated["loss_sum"] / evaluated["target_tokens"])
                         if evaluated is not None else None),
           "grads": _grad_probe(step_grads),
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


def make_batch(cfg, seed: int, packed: bool) -> dict[str, np.ndarray]:
  """8 rows of 40 tokens with 3 frames (with seq 2 they do not split evenly: each piece's
  devices get them padded to 4), frame j's tokens at 2 + 12 j ... (they fall in every
  piece); packed: three segments a row, the first boundary at 19, 20, 21 or 22."""
  rng = np.random.default_rng(seed)
  b, t, f, k = 8, 40, 3, cfg.tokens_per_frame
  tokens = rng.integers(5, 64, (b, t)).astype(np.int32)
  vision_index = np.full((b, t), -1, np.int32)
  for frame in range(f):
    vision_index[:, 2 + 12 * frame:2 + 12 * frame + k] = np.arange(frame * k, (frame + 1) * k)
  segment_ids = np.ones((b, t), np.int32)
  if packed:
    for row in range(b):
      segment_ids[row, t // 2 - 1 + row % 4:] = 2
      segment_ids[row, 3 * t // 4 + 1:] = 3
  return dict(tokens=tokens, loss_mask=rng.random((b, t)) < 0.7, vision_index=vision_index,
              segment_ids=segment_ids,
              frames=rng.integers(0, 255, (b, f, cfg.image_size, cfg.image_size, 3), np.uint8),
              frame_mask=np.ones((b, f), bool))


def parse_layout(arg: str) -> dict:
  """'data,fsdp,zero1[,seq[,policy[,packed]]]' -> run_layout's keywords."""
  parts = arg.split(",") + ["1", "magc", "0"][len(arg.split(",")) - 3:]
  data, fsdp, zero1, seq = map(int, parts[:4])
  return dict(data=data, fsdp=fsdp, zero1=bool(zero1), seq=seq, policy=parts[4],
              packed=bool(int(parts[5])))


if __name__ == "__main__":
  seeds = [0]
  args = [a for a in sys.argv[1:] if not a.startswith("--seed")]
  for a in sys.argv[1:]:
    if a.startswith("--seed="):
      seeds = [int(v) for v in a[len("--seed="):].split(",")]
  for arg in args:
    if arg == "pipeline":   # MA-GC's wavefront on a toy stack (tests/remat/pipeline_check.py)
      from tests.remat.pipeline_check import check, checkpoint_growth, temp_bytes
      for seed in seeds:
        print("RESULT " + json.dumps({"pipeline": check(seed, jax.devices()), "seed": seed}),
              flush=True)
      print("RESULT " + json.dumps({"pipeline_memory": temp_bytes(jax.devices())}), flush=True)
      print("RESULT " + json.dumps({"pipeline_growth": checkpoint_growth(jax.devices())}),
            flush=True)
      continue
    for result in run_layout(**parse_layout(arg), seeds=tuple(seeds)):
      print("RESULT " + json.dumps(result), flush=True)
