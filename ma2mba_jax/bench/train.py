"""Training-step benchmark of a real Video-Ma²mba preset at long lengths.

  python -m ma2mba_jax.bench.train --preset=3.1b --lengths=16384,32768,65536 --json=out.json

One optimizer step of the trainer's own `train_step` (all groups trained, AdamW, MA-GC with
l/s auto or given, checkpoints optionally offloaded to the host, bf16 compute, f32 master weights) on a random batch of one sequence: frames at
1 FPS with K tokens each, interleaved with text as the data pipeline lays them out. Each
length runs in a fresh process (the allocator's peak cannot be reset); OOM is a result.
Reports step time, tokens/s and peak device memory (everything: weights, gradients,
optimizer state and activations).

Several GPUs: `--mesh=data,fsdp,zero1[,seq]` (train/sharding.py's layouts) runs one
sequence per data x fsdp row, each split over `seq` devices, and reports tokens/s per device
and the highest peak of any device:

  python -m ma2mba_jax.bench.train --preset=3.1b --lengths=16384 --mesh=2,1,1   # ZeRO-1
  python -m ma2mba_jax.bench.train --preset=3.1b --lengths=1048576 --mesh=1,1,0,4 \
      --l=8 --s=262144 --cell_saves=layers       # one sequence over 4 GPUs (MA-GC: s = T/4)
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "3.1b", "Video-Ma2mba preset.")
_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768"], "Tokens per sequence.")
_POLICY = flags.DEFINE_string("policy", "magc", "Remat policy.")
_CELL_SAVES = flags.DEFINE_string("cell_saves", "nothing", "MA-GC cell policy.")
_L = flags.DEFINE_string("l", "auto", "MA-GC layers per group (or auto).")
_S = flags.DEFINE_string("s", "auto", "MA-GC tokens per time block (or auto).")
_OFFLOAD = flags.DEFINE_enum("offload", "none", ["none", "sequence", "all"],
                             "Checkpoints kept in host memory (remat/cells.py).")
_TEXT_EVERY = flags.DEFINE_integer("text_every", 4, "A 32-token caption after every N frames "
                                   "(0: text only, the LM backbone's step).")
_JSON = flags.DEFINE_string("json", None, "Write results here.")
_CHILD = flags.DEFINE_integer("child", 0, "Internal: run one length and print JSON.")
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds per length.")
_MESH = flags.DEFINE_string("mesh", "1,1,0", "data,fsdp,zero1[,seq]: one row per data x fsdp "
                            "device group, its tokens split over seq devices.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps after the compile; the last is reported.")


def synthetic_batch(seqlen: int, k: int, image_size: int, vocab: int, text_every: int):
  """One row: blocks of `text_every` frames (K tokens each) and a 32-token caption;
  text_every=0: text only, every token a target (the LM backbone's step: one masked frame,
  which the encoder skips)."""
  import numpy as np
  rng = np.random.default_rng(0)
  if text_every == 0:
    return dict(tokens=rng.integers(10, vocab, (1, seqlen)).astype(np.int32),
                loss_mask=np.ones((1, seqlen), bool),
                vision_index=np.full((1, seqlen), -1, np.int32),
                segment_ids=np.ones((1, seqlen), np.int32),
                frames=np.zeros((1, 1, image_size, image_size, 3), np.uint8),
                frame_mask=np.zeros((1, 1), bool)), 0
  block = text_every * k + 32
  n_frames = (seqlen // block) * text_every
  tokens = rng.integers(10, vocab, (1, seqlen)).astype(np.int32)
  vision_index = np.full((1, seqlen), -1, np.int32)
  loss_mask = np.zeros((1, seqlen), bool)
  for i in range(seqlen // block):
    start = i * block
    frames = np.arange(i * text_every * k, (i + 1) * text_every * k)
    vision_index[0, start:start + text_every * k] = frames
    loss_mask[0, start + text_every * k:start + block] = True
  return dict(tokens=tokens, loss_mask=loss_mask, vision_index=vision_index,
              segment_ids=np.ones((1, seqlen), np.int32),
              frames=rng.integers(0, 255, (1, n_frames, image_size, image_size, 3), np.uint8),
              frame_mask=np.ones((1, n_frames), bool)), n_frames


def run_one(seqlen: int) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from flax import nnx

  from ma2mba_jax.bench import common
  from ma2mba_jax.data.batch import Batch
  from ma2mba_jax.models.video_lm import VideoMa2mba
  from ma2mba_jax.models.video_presets import video_config
  from ma2mba_jax.remat import magc
  from ma2mba_jax.remat.settings import RematPolicy, RematSettings
  from ma2mba_jax.train import optim, sharding
  from ma2mba_jax.train.step import TrainState, make_train_step

  cfg = video_config(_PRESET.value, compute_dtype="bfloat16")
  remat = RematSettings(policy=_POLICY.value, l=_L.value, s=_S.value,
                        cell_saves=_CELL_SAVES.value, offload=_OFFLOAD.value)
  data, fsdp, zero1, seq = (list(map(int, _MESH.value.split(","))) + [1])[:4]
  n_dev, n_rows = data * fsdp * seq, data * fsdp
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "seq": seq}),
                            jax.devices()[:n_dev])
  row = {"preset": _PRESET.value, "T": seqlen, "policy": _POLICY.value,
         "offload": _OFFLOAD.value, "mesh": _MESH.value, "devices": n_dev}
  if remat.policy == RematPolicy.MAGC:
    cell_l, cell_s, _ = magc.resolve(remat, cfg.llm_config, -(-seqlen // seq),
                                     pipeline_devices=seq)
    remat = remat.replace(l=cell_l, s=cell_s)
    row.update(l=cell_l, s=cell_s)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract)
  optim_cfg = ml_collections.ConfigDict(dict(
      lr_llm=4e-5, lr_vision=4e-6, lr_projector=4e-5, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, grad_clip=1.0, warmup_frac=0.1))
  optimizer = optim.make_optimizer(optim_cfg, 1000, abstract_params)
  param_shardings, opt_shardings = sharding.layout_shardings(
      mesh, abstract_params, jax.eval_shape(optimizer.init, abstract_params), zero1=bool(zero1))
  params = jax.jit(lambda: nnx.to_pure_dict(
      nnx.state(VideoMa2mba(cfg, rngs=nnx.Rngs(0)), nnx.Param)), out_shardings=param_shardings)()
  replicated = sharding.replicated(mesh)
  state_shardings = TrainState(step=replicated, trainable=param_shardings, frozen={},
                               opt_state=opt_shardings, rng=replicated)
  state = jax.device_put(TrainState(
      step=jnp.zeros((), jnp.int32), trainable=params, frozen={},
      opt_state=jax.jit(optimizer.init, out_shardings=opt_shardings)(params),
      rng=jax.random.key(0)), state_shardings)
  batch, n_frames = synthetic_batch(seqlen, cfg.tokens_per_frame, cfg.image_size,
                                    cfg.llm_config.vocab_size, _TEXT_EVERY.value)
  batch = Batch.from_dict(sharding.shard_batch(
      mesh, {k: np.repeat(v, n_rows, axis=0) for k, v in batch.items()}))
  row["frames"] = n_frames
  step = jax.jit(make_train_step(graphdef, optimizer, remat, n_micro=1, mesh=mesh),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  metrics = None

  def one_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    return metrics

  try:
    compiled = step.lower(state, batch).compile()
    times = common.time_steps(one_step, _STEPS.value)
  except Exception as err:  # noqa: BLE001 - an OOM is a result
    return common.oom_row(err, row)
  row["step_s"] = times[-1]
  row["tokens_per_s"] = n_rows * seqlen / times[-1]
  row["tokens_per_s_per_device"] = n_rows * seqlen / times[-1] / n_dev
  row["loss"] = float(metrics["loss"])
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  if all(p is not None for p in peaks):
    row["peak_GB"] = max(peaks) / 1e9                     # the fullest device
  row["params"] = sum(a.size for a in jax.tree.leaves(params))
  return row


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(run_one(_CHILD.value)), flush=True)
    return
  from ma2mba_jax.bench import common
  rows = []
  for seqlen in map(int, _LENGTHS.value):
    cmd = [sys.executable, "-m", "ma2mba_jax.bench.train", f"--child={seqlen}",
           f"--preset={_PRESET.value}", f"--policy={_POLICY.value}",
           f"--cell_saves={_CELL_SAVES.value}", f"--l={_L.value}", f"--s={_S.value}",
           f"--offload={_OFFLOAD.value}", f"--text_every={_TEXT_EVERY.value}",
           f"--mesh={_MESH.value}", f"--steps={_STEPS.value}"]
    row = common.run_child(cmd, timeout=_TIMEOUT.value, identity={"T": seqlen, "mesh": _MESH.value})
    print(row, flush=True)
    rows.append(row)
  print()
  columns = ["preset", "mesh", "policy", "T", "frames", "offload", "l", "s", "step_s",
             "tokens_per_s", "tokens_per_s_per_device", "peak_GB", "loss", "error"]
  common.print_table(rows, [c for c in columns if any(c in r for r in rows)])
  common.write_json(_JSON.value, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
  app.run(main)
