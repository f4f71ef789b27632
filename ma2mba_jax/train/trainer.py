"""train_and_evaluate(config, workdir): one training stage, resumable at any step.

    check inputs -> remember the config -> state (init or restore) -> loop -> eval -> export
    loop: data (Grain) -> sharded batch -> train_step (jit, donated state) -> metrics /
          checkpoints

Nothing is written to the workdir before every input is checked: config values, the
tokenizer, the data sources (their index is built, and with data.validate_media every media
file opened), init_from, and the workdir's remembered config (workdir.py: a rerun with other
settings stops, naming them). The run resumes by itself from the newest checkpoint in
workdir (model, optimizer, step, RNG and the data iterator). Every step's loss is checked,
and a checkpoint is saved only when every loss so far and the state are finite. At the end
the model is exported to workdir/model (params + model_config.json, see convert/io.py),
which the next stage's `init_from`, `evaluate` and `generate` read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ma2mba_jax.convert import io as model_io
from ma2mba_jax.convert import pretrained
from ma2mba_jax.data import manifest
from ma2mba_jax.data.batch import Batch
from ma2mba_jax.data.batching import DEFAULT_PACK_WINDOW
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.models.video_lm import VideoConfig, VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.remat import magc, measure
from ma2mba_jax.remat.settings import RematPolicy, RematSettings
from ma2mba_jax.train import config_check
from ma2mba_jax.train import checkpoint, metrics as metrics_lib, optim, sharding
from ma2mba_jax.train import workdir as workdir_lib
from ma2mba_jax.train.bucket_steps import StepPerLength
from ma2mba_jax.errors import ConfigError, NonFiniteLossError
from ma2mba_jax.train.step import TrainState, make_eval_step, make_train_step, merge_params
from ma2mba_jax.xla_memory import tree_bytes

MODEL_EXPORT = workdir_lib.MODEL_EXPORT
# Written after the export is complete: the step it holds (a rerun with nothing left to
# train does not write the export again, so the next stage's input stays the same).
EXPORT_MARKER = "export.json"
VAL_SPLIT = "val"
__all__ = ["train_and_evaluate", "evaluate_loss", "export_model", "NonFiniteLossError"]


# --------------------------------------------------------------------------- configuration


def build_model_config(config: ml_collections.ConfigDict, tokenizer_vocab: int):
  overrides = dict(compute_dtype=config.model.compute_dtype, ssd_impl=config.model.ssd_impl,
                   frames_per_microbatch=config.model.frames_per_microbatch)
  if config.model.preset == "tiny":
    overrides["llm_vocab_size"] = tokenizer_vocab  # the tiny LM takes the tokenizer's size
  model_cfg = video_config(config.model.preset, **overrides)
  lm_vocab = model_cfg.llm_config.padded_vocab_size
  if tokenizer_vocab > lm_vocab:
    raise ConfigError(f"the tokenizer has {tokenizer_vocab} ids but model preset "
                      f"{config.model.preset!r} embeds only {lm_vocab}: use the model's "
                      f"tokenizer (config.data.tokenizer)")
  return model_cfg


def require_data(config: ml_collections.ConfigDict) -> None:
  """ConfigError saying what to give when the config names no training data."""
  data = config.data
  make = "python -m ma2mba_jax.data.synthetic --out DIR --size small"
  if data.synthetic_dir:
    if not os.path.isfile(os.path.join(data.synthetic_dir, manifest.FILE)):
      raise ConfigError(
          f"config.data.synthetic_dir={data.synthetic_dir!r} holds no synthetic dataset (no "
          f"manifest.json): write one with `{make.replace('DIR', data.synthetic_dir)}` "
          f"(scripts/demo.sh writes runs/demo/data)")
    return
  if not data.sources:
    raise ConfigError(
        f"no training data: give --config.data.synthetic_dir=DIR (a synthetic set: `{make}`), "
        f"or config.data.sources and config.data.tokenizer in a config file (configs/common.py"
        f"), or use the demo variant --config=configs/stage{config.stage}.py:demo (on "
        f"runs/demo/data, which scripts/demo.sh or `{make.replace('DIR', 'runs/demo/data')}` "
        f"writes)")


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  if config.data.tokenizer:
    return config.data.tokenizer
  if config.data.synthetic_dir:
    return os.path.join(config.data.synthetic_dir, "tokenizer.json")
  raise ConfigError("config.data.tokenizer is empty: give a local tokenizer.json "
                    "(GPT-NeoX's for the released Mamba-2 models)")


def data_settings(config: ml_collections.ConfigDict, model_cfg: Any) -> dict[str, Any]:
  """The Grain pipeline's config for this process."""
  require_data(config)
  if config.data.synthetic_dir:
    sources = manifest.sources(config.data.synthetic_dir, config.stage)
  else:
    sources = config.data.sources.to_dict()
  if not sources:
    raise ConfigError(f"config.data.synthetic_dir={config.data.synthetic_dir!r} has no "
                      f"sources for stage {config.stage}")
  n_proc = jax.process_count()
  if config.optim.global_batch % n_proc:
    raise ConfigError(f"config.optim.global_batch={config.optim.global_batch} must be a "
                      f"multiple of the number of processes {n_proc}")
  return dict(
      stage=config.stage, sources=sources, fps=config.data.fps,
      image_size=model_cfg.image_size, tokens_per_frame=model_cfg.tokens_per_frame,
      max_frames=config.data.max_frames, max_tokens=config.data.max_tokens,
      batch_size=config.optim.global_batch // n_proc, packing=bool(config.data.packing),
      pack_window=config.data.get("pack_window", DEFAULT_PACK_WINDOW),
      bucket_lengths=config.data.get("bucket_lengths"),
      num_workers=config.data.num_workers, worker_buffer_size=config.data.worker_buffer_size,
      seed=config.seed, skip_bad=config.data.skip_bad, qa_per_sample=config.data.qa_per_sample,
      validate_media=config.data.validate_media)


@functools.cache
def _abstract_model(model_cfg: VideoConfig) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, parameter shapes as a pure dict): the model traced once per config, for the
  MA-GC budget (`_training_state_bytes`) and the layout (`model_layout`) alike."""
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: VideoMa2mba(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def _training_state_bytes(config: ml_collections.ConfigDict, model_cfg: Any,
                          mesh: jax.sharding.Mesh, state_memory: str = "device"
                          ) -> dict[str, float]:
  """Bytes per device of weights, gradients and optimizer state (the fixed part of the MA-GC
  activation budget), from shapes only, after this mesh's sharding (FSDP, ZeRO-1), with the
  moments in optim.moments_dtype. With state_memory='host' the optimizer state is on the
  device only during the update, after the activations are freed: it takes none of it."""
  _, params = _abstract_model(model_cfg)
  trainable, _ = _split_groups(params, optim.trainable_groups(config.optim))
  optimizer = optim.make_optimizer(config.optim, config.train.steps, trainable)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  fsdp = mesh.shape["fsdp"]
  opt_split = fsdp * (mesh.shape["data"] if config.mesh.zero1 else 1)
  n_micro = config.optim.global_batch // (config.optim.micro_batch
                                          * sharding.batch_shards(mesh))
  grad_copies = 2 if n_micro > 1 else 1  # the step's accumulator beside one micro-batch's
  on_device = state_memory != "host"
  return dict(weight_bytes=tree_bytes(params) / fsdp,
              grad_bytes=grad_copies * tree_bytes(trainable) / fsdp,
              opt_state_bytes=on_device * tree_bytes(opt_state) / opt_split)


def resolved_remat(config: ml_collections.ConfigDict, model_cfg: Any,
                   mesh: jax.sharding.Mesh | None = None, state_memory: str | None = None,
                   cache: measure.CompileCache | None = None,
                   tokens: int | None = None) -> RematSettings:
  """config.remat with MA-GC's l/s (and, with planner=measure, cell_saves/offload 'auto')
  turned into concrete values for rows of `tokens` tokens (default config.data.max_tokens;
  a length bucket's length with data.bucket_lengths, see train/bucket_steps.py).

  planner=measure compiles candidate settings and keeps the fastest whose measured memory
  fits the device after weights, gradients and optimizer state (remat/measure.py); with no
  device memory known (CPU) and no remat.budget_gb it takes the paper model's choice.
  planner=model minimises the paper's memory model (remat/planner.py).
  state_memory: where the optimizer state lives ('device' or 'host'; default
  config.optim.state_memory, 'auto' counted as 'device'); cache: compiled measurements to
  reuse (resolved_memory plans twice).
  """
  if state_memory is None:
    state_memory = config.optim.get("state_memory", "device")
  tokens = config.data.max_tokens if tokens is None else tokens
  remat_cfg = RematSettings.from_config(config.remat)
  n_seq = check_sequence_remat(config, model_cfg)
  # With a seq axis the measuring planner (which compiles a one-device step) is not run:
  # 'auto' l and s come from the memory model on a piece, counting the checkpoints the
  # wavefront pipeline (remat/pipeline.py) stacks over its idle ticks (remat/planner.py).
  measured = (remat_cfg.policy == RematPolicy.MAGC and n_seq == 1
              and remat_cfg.planner == "measure")
  if not measured:  # 'auto' is the measuring planner's to resolve; otherwise the defaults
    remat_cfg = remat_cfg.replace(
        cell_saves="nothing" if remat_cfg.cell_saves == "auto" else remat_cfg.cell_saves,
        offload="none" if remat_cfg.offload == "auto" else remat_cfg.offload)
  if remat_cfg.policy != RematPolicy.MAGC:
    return remat_cfg
  if measured:
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    budget = measure.training_budget_bytes(
        **_training_state_bytes(config, model_cfg, mesh, state_memory),
        budget_gb=remat_cfg.budget_gb)
    result = measure.plan(model_cfg.llm_config, tokens, remat_cfg,
                          budget_bytes=budget, batch=config.optim.micro_batch, show=False,
                          cache=cache)
    c = result.choice
    remat_cfg = remat_cfg.replace(l=c.l, s=c.s, cell_saves=c.cell_saves, offload=c.offload)
    logging.info("MA-GC for %d tokens (planner=measure%s): l=%d x s=%d, cell_saves=%s, "
                 "offload=%s", tokens, f", {result.note}" if result.note else "", c.l, c.s,
                 c.cell_saves, c.offload)
    return remat_cfg
  budget = None if remat_cfg.budget_gb is None else remat_cfg.budget_gb * 1e9
  itemsize = jnp.dtype(config.model.compute_dtype).itemsize
  piece = -(-tokens // n_seq)
  l, s, predicted = magc.resolve(remat_cfg, model_cfg.llm_config, piece,
                                 bytes_per_element=itemsize, budget_bytes=budget,
                                 pipeline_devices=n_seq)
  remat_cfg = remat_cfg.replace(l=l, s=s)
  where = ("" if n_seq == 1 else f" (a piece of {piece} tokens on each of {n_seq} devices"
           f"{', the wavefront pipeline' if s < piece else ''})")
  logging.info("MA-GC for %d tokens: l=%d layers x s=%d tokens per cell; memory model "
               "predicts %.2f GB of activations per sequence%s", tokens, l, s,
               predicted / 1e9, where)
  return remat_cfg


def check_sequence_remat(config: ml_collections.ConfigDict, model_cfg: Any) -> int:
  """config.mesh.seq (1: no sequence axis), after checking that its pieces hold the conv's
  halo. Every remat setting runs on the pieces: MA-GC with time blocks shorter than a piece
  as a wavefront of layer groups over the devices (remat/pipeline.py), with one block per
  piece all devices at once (train/sequence.py)."""
  n_seq = config.mesh.get("seq", 1)
  if n_seq == 1:
    return 1
  piece = -(-config.data.max_tokens // n_seq)
  if piece < model_cfg.llm_config.d_conv - 1:
    raise ConfigError(f"config.mesh.seq={n_seq}: pieces of {piece} tokens (config.data."
                      f"max_tokens={config.data.max_tokens}) are shorter than the conv's "
                      f"{model_cfg.llm_config.d_conv - 1}-token halo")
  return n_seq


# The measuring planner's compiles, kept for this process (a second plan for the same
# shapes, e.g. with the optimizer state in host memory, compiles nothing again).
PLAN_CACHE = measure.CompileCache()


def resolved_memory(config: ml_collections.ConfigDict, model_cfg: Any,
                    mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[RematSettings, str]:
  """(resolved remat settings, where the optimizer state lives: 'device' or 'host').

  optim.state_memory='auto' with the measuring MA-GC planner: the fastest MA-GC setting that
  fits beside weights and gradients with the optimizer state in host memory (the most room
  for activations); the state then stays on the device if that setting also fits with it
  there, else it goes to the host. The state's trip over PCIe (twice its bytes a step) costs
  less than a slower remat setting would. Without a measured plan (other policies,
  planner=model, an explicit remat.budget_gb, no known device memory) 'auto' is 'device'.
  """
  state_memory = config.optim.get("state_memory", "device")
  if state_memory != "auto":
    return resolved_remat(config, model_cfg, mesh, state_memory), state_memory
  measured = (config.remat.policy == "magc" and config.remat.get("planner", "measure")
              == "measure" and config.remat.budget_gb is None
              and config.mesh.get("seq", 1) == 1
              and measure.device_memory_bytes() is not None)
  if not measured:
    return resolved_remat(config, model_cfg, mesh, "device"), "device"
  remat_cfg = resolved_remat(config, model_cfg, mesh, "host", PLAN_CACHE)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  chosen = measure.Candidate(remat_cfg.l, remat_cfg.s, remat_cfg.cell_saves, remat_cfg.offload)
  (needed,) = measure.measure(model_cfg.llm_config, config.optim.micro_batch,
                              config.data.max_tokens, [chosen],
                              save_names=remat_cfg.save_names, cache=PLAN_CACHE)
  try:
    budget = measure.training_budget_bytes(
        **_training_state_bytes(config, model_cfg, mesh, "device"))
  except measure.NoPlanFitsError:   # the state alone leaves nothing for activations
    budget = 0.0
  where = "device" if needed.device_bytes <= budget else "host"
  logging.info("optim.state_memory=auto: %s (the chosen MA-GC setting needs %.2f GB; with "
               "the optimizer state on the device %.2f GB are left)", where,
               needed.device_bytes / measure.GB, budget / measure.GB)
  return remat_cfg, where


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class RunInputs:
  """Everything a run reads, checked; built before anything is written."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  model_cfg: Any
  remat_cfg: RematSettings
  mesh: jax.sharding.Mesh
  opt_state_memory: str        # 'device' or 'host' (optim.state_memory, 'auto' resolved)
  n_micro: int                 # micro-batches per optimizer step (gradient accumulation)
  groups: tuple[str, ...]      # trainable parameter groups
  train_data: Any              # Grain IterDataset of the train split (index built)
  val_data: Any                # ... of the val split, or None


def _pipeline(settings: dict, tokenizer, split: str):
  """make_pipeline (which builds the split's index, checking the annotations and, with
  validate_media, every media file); its ValueErrors about the settings become ConfigErrors."""
  try:
    return make_pipeline(settings, tokenizer=tokenizer, split=split)
  except DataError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.data: {e}") from e


def val_pipeline(config, model_cfg, tokenizer, mesh):
  """The val split's batches (one micro-batch per device each), or None without one."""
  settings = data_settings(config, model_cfg)
  if VAL_SPLIT not in settings["sources"]:
    logging.info("no '%s' split in the data sources: no validation loss", VAL_SPLIT)
    return None
  settings["batch_size"] = max(1, config.optim.micro_batch * sharding.batch_shards(mesh)
                               // jax.process_count())
  return _pipeline(settings, tokenizer, VAL_SPLIT)


def check_inputs(config: ml_collections.ConfigDict, workdir: str) -> RunInputs:
  """Checks every input of the run (config, tokenizer, data, init_from, the workdir's
  remembered config) and builds what the run reads; writes nothing."""
  config_check.validate(config)
  workdir_lib.check(config, workdir)   # first: it is quick, and a rerun's usual mistake
  require_data(config)
  groups = optim.trainable_groups(config.optim)
  if not groups:
    raise ConfigError("every learning rate in config.optim is 0: nothing to train")
  tokenizer = load_tokenizer(tokenizer_path(config),
                             add_missing=config.data.add_special_tokens)
  model_cfg = build_model_config(config, vocab_size(tokenizer))
  mesh = sharding.make_mesh(config.mesh)
  # Rows split over data x fsdp; a `seq` axis splits each row's tokens instead.
  rows_per_micro = config.optim.micro_batch * sharding.batch_shards(mesh)
  if config.optim.global_batch % rows_per_micro:
    raise ConfigError(f"config.optim.global_batch={config.optim.global_batch} must be a "
                      f"multiple of micro_batch x data x fsdp = {rows_per_micro}")
  if checkpoint.latest_saved_step(workdir) is None:  # read only when starting afresh
    workdir_lib.check_init_from(config.init_from)
    for group, path in pretrained.pretrained_dirs(config).items():
      if not os.path.isdir(path):
        raise ConfigError(f"config.model.{group}_init={path!r}: no such directory")
  train_data = _pipeline(data_settings(config, model_cfg), tokenizer, "train")
  val_data = (val_pipeline(config, model_cfg, tokenizer, mesh)
              if config.eval.batches > 0 else None)
  remat_cfg, opt_state_memory = resolved_memory(config, model_cfg, mesh)
  return RunInputs(config=config, tokenizer=tokenizer, model_cfg=model_cfg,
                   remat_cfg=remat_cfg, mesh=mesh, opt_state_memory=opt_state_memory,
                   n_micro=config.optim.global_batch // rows_per_micro, groups=groups,
                   train_data=train_data, val_data=val_data)


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class ModelLayout:
  """The model's structure, shapes and shardings, and the optimizer (no arrays yet)."""
  graphdef: nnx.GraphDef
  abstract_params: dict
  param_shardings: dict
  optimizer: Any
  abstract_opt: Any
  opt_shardings: Any


def _split_groups(params: dict, trainable_groups: tuple[str, ...]) -> tuple[dict, dict]:
  unknown = set(params) - set(optim.GROUPS)
  if unknown:
    raise ValueError(f"model has parameter groups {sorted(unknown)} outside {optim.GROUPS}")
  return ({g: params[g] for g in params if g in trainable_groups},
          {g: params[g] for g in params if g not in trainable_groups})


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def model_layout(run: RunInputs) -> ModelLayout:
  """Shapes first, then shardings (initialising comes after)."""
  config, mesh = run.config, run.mesh
  graphdef, abstract_params = _abstract_model(run.model_cfg)
  param_shardings = sharding.param_shardings(mesh, abstract_params)
  abstract_trainable, _ = _split_groups(abstract_params, run.groups)
  optimizer = optim.make_optimizer(config.optim, config.train.steps, abstract_trainable)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
  opt_shardings = sharding.opt_shardings(mesh, abstract_opt, zero1=config.mesh.zero1)
  # optim.state_memory: the state's arrays in pinned host memory, moved for the update.
  optimizer = optim.with_state_memory(optimizer, opt_shardings, run.opt_state_memory)
  if run.opt_state_memory == "host":
    opt_shardings = optim.host_shardings(opt_shardings)
  n_trainable = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_trainable))
  n_total = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params))
  logging.info("model %s: %s parameters, %s trainable (%s)", run.model_cfg.name,
               f"{n_total:,}", f"{n_trainable:,}", ", ".join(run.groups))
  return ModelLayout(graphdef=graphdef, abstract_params=abstract_params,
                     param_shardings=param_shardings, optimizer=optimizer,
                     abstract_opt=abstract_opt, opt_shardings=opt_shardings)


def _initial_params(config, model_cfg, abstract_params, shardings) -> dict:
  """Random init (sharded from the start), then model.vision_init / model.llm_init (HF
  checkpoints, convert/pretrained.py) if set, then `init_from` if set."""
  def create():
    return nnx.to_pure_dict(nnx.state(VideoMa2mba(model_cfg, rngs=nnx.Rngs(config.seed)),
                                      nnx.Param))
  params = jax.jit(create, out_shardings=shardings)()
  params = pretrained.apply_pretrained(config, model_cfg, params, shardings)
  src = workdir_lib.check_init_from(config.init_from)
  if not src:
    return params
  cls, _ = model_io.read_model_config(src)
  target = _with_shardings(abstract_params, shardings)
  if cls is VideoMa2mba:
    params = model_io.restore_params(src, target)
    logging.info("init_from %s: all parameters", src)
  elif cls.__name__ == "Mamba2LM":
    params = {**params, "llm": model_io.restore_params(src, target["llm"])}
    logging.info("init_from %s: the LM's parameters (converted Mamba-2)", src)
  else:
    raise ConfigError(f"config.init_from={config.init_from!r} holds a {cls.__name__}; "
                      f"expected a VideoMa2mba or Mamba2LM export")
  return params


def initial_state(run: RunInputs, layout: ModelLayout, ckpt: checkpoint.Checkpointer,
                  data_iter: Any) -> tuple[TrainState, int]:
  """(state, first step): the newest checkpoint's (the data iterator restored in place),
  or a fresh state from init / init_from at step 0."""
  config = run.config
  start = ckpt.latest_step()
  if start is None:
    params = _initial_params(config, run.model_cfg, layout.abstract_params,
                             layout.param_shardings)
    trainable, frozen = _split_groups(params, run.groups)
    opt_state = jax.jit(layout.optimizer.init, out_shardings=layout.opt_shardings)(trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=opt_state, rng=jax.random.key(config.seed)), 0
  restored, opt_state, rng, _ = ckpt.restore(
      start, abstract_params=_with_shardings(layout.abstract_params, layout.param_shardings),
      abstract_opt_state=_with_shardings(layout.abstract_opt, layout.opt_shardings),
      data_iter=data_iter)
  trainable, frozen = _split_groups(restored, run.groups)
  logging.info("resumed from %s at step %d", ckpt.manager.directory, start)
  print(f"[stage {config.stage}] resumed at step {start}", flush=True)
  return TrainState(step=jnp.asarray(start, jnp.int32), trainable=trainable, frozen=frozen,
                    opt_state=opt_state, rng=rng), start


def place_and_compile(run: RunInputs, layout: ModelLayout, state: TrainState):
  """(state placed with its shardings, the jitted train_step)."""
  mesh, param_shardings, opt_shardings = run.mesh, layout.param_shardings, layout.opt_shardings
  graphdef, optimizer, remat_cfg, n_micro = (layout.graphdef, layout.optimizer, run.remat_cfg,
                                             run.n_micro)
  # Every input of the step carries its sharding before the transfer guard: the state is
  # placed once, and the step returns it with the same shardings (so step 2 reuses step 1's
  # executable and nothing moves between devices implicitly).
  state_shardings = TrainState(
      step=sharding.replicated(mesh), rng=sharding.replicated(mesh),
      trainable={g: param_shardings[g] for g in state.trainable},
      frozen={g: param_shardings[g] for g in state.frozen}, opt_state=opt_shardings)
  state = jax.device_put(state, state_shardings)
  held = {name: max(sharding.bytes_per_device(tree).values(), default=0) for name, tree in
          (("params", (state.trainable, state.frozen)), ("opt_state", state.opt_state))}
  logging.info("mesh %s%s: most bytes on one device: params %d, optimizer state %d",
               dict(mesh.shape), " ZeRO-1" if run.config.mesh.zero1 else "",
               held["params"], held["opt_state"])
  def build(remat_cfg: RematSettings):
    # With packing the LM restarts its state where segment_ids changes (step.loss_sums).
    return jax.jit(make_train_step(graphdef, optimizer, remat_cfg, n_micro, mesh=mesh,
                                   packed=bool(run.config.data.packing)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))

  if not run.config.data.get("bucket_lengths"):
    return state, build(remat_cfg)
  # Length buckets: MA-GC planned per bucket length (what config.remat leaves 'auto'), one
  # step (one compile) per length; remat_cfg is the plan for max_tokens, made already.
  config = run.config
  plan = lambda tokens: resolved_remat(config, run.model_cfg, mesh, run.opt_state_memory,
                                       PLAN_CACHE, tokens=tokens)
  return state, StepPerLength(build, plan, {config.data.max_tokens: remat_cfg})


# --------------------------------------------------------------------------- finiteness


class _NotFinite(Exception):
  def __init__(self, step: int, what: str):
    super().__init__(step, what)
    self.step, self.what = step, what


class _LossWatch:
  """Checks every step's loss, one step late (the host fetches step N-1's loss while step N
  runs, so it does not wait); `flush` checks the newest at once (before a save)."""

  def __init__(self):
    self._pending: tuple[int, jax.Array] | None = None

  def push(self, step: int, loss: jax.Array) -> None:
    previous, self._pending = self._pending, (step, loss)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  @staticmethod
  def _check(step: int, loss: jax.Array) -> None:
    value = float(jax.device_get(loss))
    if not math.isfinite(value):
      raise _NotFinite(step, f"the loss is {value}")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  # Host-memory leaves (optim.state_memory='host') are brought over to be read.
  leaves = [jnp.all(jnp.isfinite(jax.device_put(x, jax.memory.Space.Device)))
            for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _check_state_finite(state: TrainState, step: int) -> None:
  """Before a save: the trained parameters and the optimizer state are finite (a finite
  loss does not prove it: the last update may have overflowed)."""
  if not bool(jax.device_get(_all_finite((state.trainable, state.opt_state)))):
    raise _NotFinite(step, "the parameters or optimizer state are not finite after it (the "
                           "loss was finite)")


def _non_finite_message(config, bad: _NotFinite, ckpt: checkpoint.Checkpointer,
                        workdir: str) -> str:
  """The stop message; removes the checkpoint of the step just before a non-finite loss (its
  parameters are finite but give that loss: resuming from it would stop again at once)."""
  ckpt.wait()
  newest = ckpt.latest_step()
  removed = ""
  if bad.what.startswith("the loss") and newest is not None and newest == bad.step - 1:
    ckpt.delete(newest)
    removed = (f" Checkpoint {newest} was removed: its parameters give that non-finite "
               f"loss.")
    newest = ckpt.latest_step()
  where = checkpoint.checkpoint_dir(workdir)
  if newest is None:
    resume = ("No checkpoint is left from before it, so running again starts from step 0: "
              "lower config.optim.lr_* or check the data")
  else:
    resume = (f"The newest checkpoint, step {newest} in {where}, is finite: lower "
              f"config.optim.lr_* (or check the data) and run the same command again with "
              f"--config.train.allow_changes=optim to resume from step {newest}")
  return (f"stage {config.stage}: {bad.what} at step {bad.step}, the first non-finite step; "
          f"nothing from it on was saved.{removed} {resume}.")


# --------------------------------------------------------------------------- the loop


class _RunClock:
  """What every logged record carries beside its step (issue 17's packed/unpacked
  comparisons): wall_s, seconds since this process started the stage (input checks and
  compiles included); eval_s, the part of it spent in validation; examples, training
  examples placed in batches so far (several a row with packing; restored on resume)."""

  def __init__(self, data_iter: Any, started: float):
    self.started = started
    self.eval_s = 0.0
    self._data_iter = data_iter

  def scalars(self) -> dict[str, float]:
    out = {"wall_s": time.perf_counter() - self.started, "eval_s": self.eval_s}
    stats = getattr(self._data_iter, "stats", None)
    if stats is not None:
      out["examples"] = float(stats["examples"])
    return out

  def evaluate(self, evaluator: Evaluator, state: TrainState) -> dict:
    began = time.perf_counter()
    scalars = evaluator(state)
    self.eval_s += time.perf_counter() - began
    return scalars


def _train_loop(run: RunInputs, state: TrainState, train_step, start: int,
                ckpt: checkpoint.Checkpointer, data_iter: Any, evaluator: Evaluator | None,
                writer: metrics_lib.MetricWriter, workdir: str,
                clock: _RunClock) -> tuple[TrainState, dict]:
  """Trains from step `start` to train.steps (or train.stop_at_step); returns the state and
  the last logged metrics."""
  config, mesh = run.config, run.mesh
  total_steps = config.train.steps
  stop = min(config.train.stop_at_step or total_steps, total_steps)
  progress = metrics_lib.Progress(start, total_steps)
  watch = _LossWatch()
  last = {}
  shapes_seen = set()  # token shapes the train step saw: one compile each (length buckets)
  try:
    for step in range(start, stop):
      rows = Batch.from_dict(next(data_iter))           # this process's rows (numpy)
      batch = Batch.from_dict(sharding.shard_batch(mesh, rows.as_dict()))
      with jax.transfer_guard("disallow"):
        state, step_metrics = train_step(state, batch)
      done = step + 1
      watch.push(done, step_metrics["loss"])
      progress.add_tokens(int(np.sum(rows.segment_ids > 0)), padded=int(rows.segment_ids.size))
      if rows.tokens.shape not in shapes_seen:  # jit compiles once per shape (bucket)
        shapes_seen.add(rows.tokens.shape)
        logging.info("train step compiled for batch shape %s: %d compile(s) so far",
                     rows.tokens.shape, len(shapes_seen))
      if done == start + 1:
        watch.flush()            # waits for the first step: rates and ETA start after it
        progress.start(done)
      if done % config.train.log_every == 0 or done == total_steps:
        watch.flush()
        last = _log_step(config, writer, progress, done, step_metrics, clock)
      if evaluator is not None and config.eval.every_steps and (
          done % config.eval.every_steps == 0):
        last.update(_log_eval(config, writer, done, clock.evaluate(evaluator, state), clock))
      if done % config.ckpt.every_steps == 0 or done in (total_steps, stop):
        watch.flush()
        _check_state_finite(state, done)
        ckpt.save(done, params=merge_params(state.trainable, state.frozen),
                  opt_state=state.opt_state, rng=state.rng, data_iter=data_iter,
                  extra_meta={"stage": config.stage})
    watch.flush()
    ckpt.wait()
  except _NotFinite as bad:
    raise NonFiniteLossError(_non_finite_message(config, bad, ckpt, workdir)) from None
  return state, last


def _log_step(config, writer, progress, done: int, step_metrics: dict,
              clock: _RunClock) -> dict:
  total_steps = config.train.steps
  scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  scalars.update({f"lr/{g}": lr for g, lr in
                  optim.learning_rates(config.optim, total_steps, done).items()})
  scalars.update(progress.report(done))
  scalars.update(clock.scalars())
  writer.write(done, scalars)
  print(metrics_lib.format_line(config.stage, done, total_steps, scalars), flush=True)
  return scalars


def _log_eval(config, writer, done: int, scalars: dict, clock: _RunClock) -> dict:
  if scalars:
    scalars = {**scalars, **clock.scalars()}
    writer.write(done, scalars)
    print(f"[stage {config.stage}] step {done}: validation loss {scalars['val_loss']:.4f} "
          f"over {scalars['val_tokens']:.0f} target tokens", flush=True)
  return scalars


# --------------------------------------------------------------------------- evaluation


class Evaluator:
  """Mean validation cross-entropy over the first `batches` batches of a split; compiled
  once (every batch has the same shape), reusable through the run."""

  def __init__(self, dataset: Any, batches: int, graphdef: nnx.GraphDef,
               remat_cfg: RematSettings, mesh: jax.sharding.Mesh, packed: bool = False):
    self._dataset, self._batches, self._mesh = dataset, batches, mesh
    self._eval_step = jax.jit(make_eval_step(graphdef, remat_cfg, packed=packed, mesh=mesh))

  def __call__(self, state: TrainState) -> dict:
    total, count = 0.0, 0.0
    for i, rows in enumerate(self._dataset):  # a fresh iterator: the split's start
      if i >= self._batches:
        break
      batch = Batch.from_dict(sharding.shard_batch(self._mesh, rows))
      out = jax.device_get(self._eval_step(state, batch))
      total += float(out["loss_sum"])
      count += float(out["target_tokens"])
    return {"val_loss": total / count, "val_tokens": count} if count else {}


def evaluate_loss(config: ml_collections.ConfigDict, *, model_cfg: VideoConfig,
                  graphdef: nnx.GraphDef, state: TrainState, remat_cfg: RematSettings,
                  tokenizer: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean validation cross-entropy over config.eval.batches batches of the 'val' split
  ({"val_loss", "val_tokens"}; {} without a val split)."""
  dataset = val_pipeline(config, model_cfg, tokenizer, mesh)
  if dataset is None:
    return {}
  return Evaluator(dataset, config.eval.batches, graphdef, remat_cfg, mesh,
                   packed=bool(config.data.packing))(state)


# --------------------------------------------------------------------------- export


def export_model(workdir: str, graphdef: nnx.GraphDef, state: TrainState,
                 tokenizer: Any = None) -> str:
  """Writes workdir/model (params + model_config.json, and the run's tokenizer with its
  added special tokens: tokenizer.json) for the next stage and inference.

  Runs on every process: the Orbax save inside waits for all of them (each writes its own
  shards), so returning early on the others would hang process 0."""
  model = nnx.merge(graphdef, merge_params(state.trainable, state.frozen))
  path = model_io.save_model(model, os.path.join(workdir, MODEL_EXPORT), overwrite=True,
                             tokenizer=tokenizer)
  logging.info("exported the model to %s", path)
  return str(path)


def _exported_step(workdir: str) -> int | None:
  """The step of workdir/model, if its export finished."""
  path = os.path.join(workdir, EXPORT_MARKER)
  if not os.path.isfile(path) or not os.path.isfile(
      os.path.join(workdir, MODEL_EXPORT, model_io.CONFIG_FILE)):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("step")


def _mark_exported(workdir: str, step: int) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, EXPORT_MARKER), "w", encoding="utf-8") as f:
      json.dump({"step": step}, f)


# --------------------------------------------------------------------------- the stage


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the stage described by `config` in `workdir`; returns the last
  logged metrics."""
  started = time.perf_counter()
  run = check_inputs(config, workdir)
  if jax.process_index() == 0:
    workdir_lib.remember(config, workdir)   # the first write
  logging.info("config:\n%s", config)
  total_steps = config.train.steps
  saved = checkpoint.latest_saved_step(workdir)
  if saved is not None and saved >= total_steps and _exported_step(workdir) == saved:
    print(f"[stage {config.stage}] already trained to step {saved} and exported to "
          f"{os.path.join(workdir, MODEL_EXPORT)}", flush=True)
    return {}
  layout = model_layout(run)
  data_iter = iter(run.train_data)
  clock = _RunClock(data_iter, started)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt)
  writer = None
  try:
    state, start = initial_state(run, layout, ckpt, data_iter)
    state, train_step = place_and_compile(run, layout, state)
    evaluator = (Evaluator(run.val_data, config.eval.batches, layout.graphdef, run.remat_cfg,
                           run.mesh, packed=bool(config.data.packing))
                 if run.val_data is not None else None)
    writer = metrics_lib.MetricWriter(workdir, stage=config.stage)
    state, last = _train_loop(run, state, train_step, start, ckpt, data_iter, evaluator,
                              writer, workdir, clock)
    finished = int(jax.device_get(state.step))
    if finished < total_steps:
      print(f"[stage {config.stage}] stopped at step {finished} of {total_steps} "
            f"(config.train.stop_at_step); run the same command again to resume", flush=True)
      return last
    evaluated_now = config.eval.every_steps and finished % config.eval.every_steps == 0
    if evaluator is not None and not evaluated_now:
      last.update(_log_eval(config, writer, finished, clock.evaluate(evaluator, state), clock))
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  export_model(workdir, layout.graphdef, state, tokenizer=run.tokenizer)
  _mark_exported(workdir, finished)
  return last
