"""train_and_evaluate(config, workdir): one training stage, resumable at any step.

    data (Grain) -> sharded batch -> train_step (jit, donated state) -> metrics / checkpoints

The run resumes by itself from the newest checkpoint in workdir (model, optimizer, step,
RNG and the data iterator). At the end the model is exported to workdir/model (params +
model_config.json, see convert/io.py), which the next stage's `init_from`, `evaluate` and
`generate` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ma2mba_jax.convert import io as model_io
from ma2mba_jax.convert import pretrained
from ma2mba_jax.data import synthetic
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.remat import magc
from ma2mba_jax.train import config_check
from ma2mba_jax.train import checkpoint, metrics as metrics_lib, optim, sharding
from ma2mba_jax.train.step import TrainState, make_eval_step, make_train_step

MODEL_EXPORT = "model"


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf."""


# --------------------------------------------------------------------------- configuration


def build_model_config(config: ml_collections.ConfigDict, tokenizer_vocab: int):
  overrides = dict(compute_dtype=config.model.compute_dtype, ssd_impl=config.model.ssd_impl,
                   frames_per_microbatch=config.model.frames_per_microbatch)
  if config.model.preset == "tiny":
    overrides["llm_vocab_size"] = tokenizer_vocab  # the tiny LM takes the tokenizer's size
  model_cfg = video_config(config.model.preset, **overrides)
  lm_vocab = model_cfg.llm_config.padded_vocab_size
  if tokenizer_vocab > lm_vocab:
    raise ValueError(f"the tokenizer has {tokenizer_vocab} ids but model preset "
                     f"{config.model.preset!r} embeds only {lm_vocab}: use the model's "
                     f"tokenizer (config.data.tokenizer)")
  return model_cfg


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  if config.data.tokenizer:
    return config.data.tokenizer
  if config.data.synthetic_dir:
    return os.path.join(config.data.synthetic_dir, "tokenizer.json")
  raise ValueError("config.data.tokenizer is empty: give a local tokenizer.json "
                   "(GPT-NeoX's for the released Mamba-2 models)")


def data_settings(config: ml_collections.ConfigDict, model_cfg: Any) -> dict[str, Any]:
  """The Grain pipeline's config for this process."""
  if config.data.synthetic_dir:
    sources = synthetic.sources(config.data.synthetic_dir, config.stage)
  else:
    sources = config.data.sources.to_dict()
  if not sources:
    raise ValueError("config.data.sources is empty and config.data.synthetic_dir is unset")
  if config.data.packing:
    raise ValueError("config.data.packing=True needs the LM to reset its state at segment "
                     "boundaries, which it does not do yet: set it to False")
  n_proc = jax.process_count()
  if config.optim.global_batch % n_proc:
    raise ValueError(f"config.optim.global_batch={config.optim.global_batch} must be a "
                     f"multiple of the number of processes {n_proc}")
  return dict(
      stage=config.stage, sources=sources, fps=config.data.fps,
      image_size=model_cfg.image_size, tokens_per_frame=model_cfg.tokens_per_frame,
      max_frames=config.data.max_frames, max_tokens=config.data.max_tokens,
      batch_size=config.optim.global_batch // n_proc, packing=False,
      num_workers=config.data.num_workers, worker_buffer_size=config.data.worker_buffer_size,
      seed=config.seed, skip_bad=config.data.skip_bad, qa_per_sample=config.data.qa_per_sample)


def resolved_remat(config: ml_collections.ConfigDict, model_cfg: Any) -> types.SimpleNamespace:
  """config.remat with MA-GC's l/s ('auto' or a number) turned into ints for this length."""
  remat_cfg = types.SimpleNamespace(**config.remat.to_dict())
  if remat_cfg.policy == "magc":
    budget = None if remat_cfg.budget_gb is None else remat_cfg.budget_gb * 1e9
    itemsize = jnp.dtype(config.model.compute_dtype).itemsize
    l, s, predicted = magc.resolve(remat_cfg, model_cfg.llm_config, config.data.max_tokens,
                                   bytes_per_element=itemsize, budget_bytes=budget)
    remat_cfg.l, remat_cfg.s = l, s
    logging.info("MA-GC: l=%d layers x s=%d tokens per cell; memory model predicts %.2f GB "
                 "of activations per sequence", l, s, predicted / 1e9)
  return remat_cfg


# --------------------------------------------------------------------------- state


def _split_groups(params: dict, trainable_groups: tuple[str, ...]) -> tuple[dict, dict]:
  unknown = set(params) - set(optim.GROUPS)
  if unknown:
    raise ValueError(f"model has parameter groups {sorted(unknown)} outside {optim.GROUPS}")
  return ({g: params[g] for g in params if g in trainable_groups},
          {g: params[g] for g in params if g not in trainable_groups})


def _initial_params(config, model_cfg, abstract_params, shardings) -> dict:
  """Random init (sharded from the start), then model.vision_init / model.llm_init (HF
  checkpoints, convert/pretrained.py) if set, then `init_from` if set."""
  def create():
    return nnx.to_pure_dict(nnx.state(VideoMa2mba(model_cfg, rngs=nnx.Rngs(config.seed)),
                                      nnx.Param))
  params = jax.jit(create, out_shardings=shardings)()
  params = pretrained.apply_pretrained(config, model_cfg, params, shardings)
  if not config.init_from:
    return params
  src = config.init_from
  export = os.path.join(src, MODEL_EXPORT)
  if os.path.isfile(os.path.join(export, model_io.CONFIG_FILE)):
    src = export  # a previous stage's workdir
  cls, _ = model_io.read_model_config(src)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, shardings)
  if cls is VideoMa2mba:
    params = model_io.restore_params(src, target)
    logging.info("init_from %s: all parameters", src)
  elif cls.__name__ == "Mamba2LM":
    params = {**params, "llm": model_io.restore_params(src, target["llm"])}
    logging.info("init_from %s: the LM's parameters (converted Mamba-2)", src)
  else:
    raise ValueError(f"config.init_from={config.init_from!r} holds a {cls.__name__}; "
                     f"expected a VideoMa2mba or Mamba2LM export")
  return params


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the stage described by `config` in `workdir`; returns the last
  logged metrics."""
  config_check.validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("config:\n%s", config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  tokenizer = load_tokenizer(tokenizer_path(config),
                             add_missing=config.data.add_special_tokens)
  model_cfg = build_model_config(config, vocab_size(tokenizer))
  remat_cfg = resolved_remat(config, model_cfg)
  mesh = sharding.make_mesh(config.mesh)
  n_devices = mesh.devices.size
  rows_per_micro = config.optim.micro_batch * n_devices
  if config.optim.global_batch % rows_per_micro:
    raise ValueError(f"config.optim.global_batch={config.optim.global_batch} must be a "
                     f"multiple of micro_batch x devices = {rows_per_micro}")
  n_micro = config.optim.global_batch // rows_per_micro

  # Model: shapes first, then shardings, then initialise.
  abstract_model = nnx.eval_shape(lambda: VideoMa2mba(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_state)
  param_shardings = sharding.tree_shardings(mesh, abstract_params)
  groups = optim.trainable_groups(config.optim)
  if not groups:
    raise ValueError("every learning rate in config.optim is 0: nothing to train")
  total_steps = config.train.steps
  params = _initial_params(config, model_cfg, abstract_params, param_shardings)
  trainable, frozen = _split_groups(params, groups)
  optimizer = optim.make_optimizer(config.optim, total_steps, trainable)
  abstract_opt = jax.eval_shape(optimizer.init, trainable)
  opt_shardings = sharding.tree_shardings(mesh, abstract_opt)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                     opt_state=opt_state, rng=jax.random.key(config.seed))
  n_trainable = sum(math.prod(a.shape) for a in jax.tree.leaves(trainable))
  n_total = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params))
  logging.info("model %s: %s parameters, %s trainable (%s)", model_cfg.name, f"{n_total:,}",
               f"{n_trainable:,}", ", ".join(groups))

  data_iter = iter(make_pipeline(data_settings(config, model_cfg), tokenizer=tokenizer))
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  start = ckpt.latest_step()
  if start is not None:
    abstract_trainable_opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_opt, opt_shardings)
    abstract_all = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_params, param_shardings)
    restored, opt_state, rng, meta = ckpt.restore(
        start, abstract_params=abstract_all, abstract_opt_state=abstract_trainable_opt,
        data_iter=data_iter)
    trainable, frozen = _split_groups(restored, groups)
    state = TrainState(step=jnp.asarray(start, jnp.int32), trainable=trainable,
                       frozen=frozen, opt_state=opt_state, rng=rng)
    logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), start)
    print(f"[stage {config.stage}] resumed at step {start}", flush=True)
  start = start or 0

  # Every input of the step carries its sharding before the transfer guard: the state is
  # placed once, and the step returns it with the same shardings (so step 2 reuses step 1's
  # executable and nothing moves between devices implicitly).
  state_shardings = TrainState(
      step=sharding.replicated(mesh), rng=sharding.replicated(mesh),
      trainable={g: param_shardings[g] for g in state.trainable},
      frozen={g: param_shardings[g] for g in state.frozen}, opt_state=opt_shardings)
  state = jax.device_put(state, state_shardings)
  train_step = jax.jit(make_train_step(graphdef, optimizer, remat_cfg, n_micro),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  writer = metrics_lib.MetricWriter(workdir, stage=config.stage)
  progress = metrics_lib.Progress(start, total_steps)
  last = {}
  last_checked = start
  try:
    stop = config.train.stop_at_step or total_steps
    for step in range(start, min(stop, total_steps)):
      batch_np = next(data_iter)
      batch = sharding.shard_batch(mesh, batch_np)
      with jax.transfer_guard("disallow"):
        state, step_metrics = train_step(state, batch)
      progress.add_tokens(int(np.sum(batch_np["segment_ids"] > 0)))
      done = step + 1
      if done % config.train.log_every == 0 or done == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(scalars["loss"]):
          raise NonFiniteLossError(
              f"stage {config.stage}: the loss is {scalars['loss']} at step {done} (it became "
              f"non-finite between steps {last_checked + 1} and {done}); the newest "
              f"checkpoint is step {ckpt.latest_step()} in {checkpoint.checkpoint_dir(workdir)}."
              f" Lower config.optim.lr_*, check the data, or resume from that checkpoint.")
        last_checked = done
        scalars.update({f"lr/{g}": lr for g, lr in
                        optim.learning_rates(config.optim, total_steps, done).items()})
        scalars.update(progress.report(done))
        writer.write(done, scalars)
        print(metrics_lib.format_line(config.stage, done, total_steps, scalars), flush=True)
        last = scalars
      if done % config.ckpt.every_steps == 0 or done in (total_steps, stop):
        ckpt.save(done, params={**state.trainable, **state.frozen}, opt_state=state.opt_state,
                  rng=state.rng, data_iter=data_iter, extra_meta={"stage": config.stage})
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()

  finished = int(jax.device_get(state.step))
  if finished < total_steps:
    print(f"[stage {config.stage}] stopped at step {finished} of {total_steps} "
          f"(config.train.stop_at_step); run the same command again to resume", flush=True)
    return last
  if config.eval.batches > 0:
    last.update(evaluate_loss(config, model_cfg, graphdef, state, remat_cfg, tokenizer, mesh))
    if "val_loss" in last:
      print(f"[stage {config.stage}] validation loss {last['val_loss']:.4f} "
            f"over {last['val_tokens']:.0f} target tokens", flush=True)
  export_model(workdir, graphdef, state, tokenizer=tokenizer)
  return last


def export_model(workdir: str, graphdef: nnx.GraphDef, state: TrainState,
                 tokenizer: Any = None) -> str:
  """Writes workdir/model (params + model_config.json, and the run's tokenizer with its
  added special tokens: tokenizer.json) for the next stage and inference."""
  if jax.process_index() != 0:
    return ""
  model = nnx.merge(graphdef, {**state.trainable, **state.frozen})
  path = model_io.save_model(model, os.path.join(workdir, MODEL_EXPORT), overwrite=True,
                             tokenizer=tokenizer)
  logging.info("exported the model to %s", path)
  return str(path)


def evaluate_loss(config, model_cfg, graphdef, state, remat_cfg, tokenizer, mesh) -> dict:
  """Mean validation cross-entropy over config.eval.batches batches of the 'val' split."""
  settings = data_settings(config, model_cfg)
  if "val" not in settings["sources"]:
    logging.info("no 'val' split in the data sources: no validation loss")
    return {}
  settings["batch_size"] = max(1, config.optim.micro_batch * mesh.devices.size
                               // jax.process_count())
  eval_step = jax.jit(make_eval_step(graphdef, remat_cfg))
  total, count = 0.0, 0.0
  for i, batch_np in enumerate(make_pipeline(settings, tokenizer=tokenizer, split="val")):
    if i >= config.eval.batches:
      break
    out = jax.device_get(eval_step(state, sharding.shard_batch(mesh, batch_np)))
    total += float(out["loss_sum"])
    count += float(out["target_tokens"])
  return {"val_loss": total / max(count, 1.0), "val_tokens": count} if count else {}
