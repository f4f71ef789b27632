"""Fails fast on a training config value out of range, naming the field.

Run by the trainer on the final config, i.e. after command-line overrides such as
`--config.remat.offload=...`, before anything is read or written.
"""

from __future__ import annotations

import ml_collections

from ma2mba_jax.models.mamba2 import COMPUTE_DTYPES
from ma2mba_jax.models.video_presets import VIDEO_PRESETS
from ma2mba_jax.remat.cells import CELL_SAVES, OFFLOAD_CHOICES
from ma2mba_jax.remat.measure import PLANNERS
from ma2mba_jax.remat.policies import POLICIES
from ma2mba_jax.train import optim
from ma2mba_jax.errors import ConfigError


def _one_of(field: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"config.{field}={value!r} is not one of {', '.join(map(str, choices))}")


def _auto_or_positive_int(field: str, value) -> None:
  if value == "auto":
    return
  try:
    ok = int(value) >= 1 and float(value) == int(value)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"config.{field}={value!r} must be 'auto' or a positive integer")


def _at_least(field: str, value, lowest: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
    raise ConfigError(f"config.{field}={value!r} must be an integer >= {lowest}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the first field out of range."""
  _one_of("model.preset", c.model.preset, tuple(VIDEO_PRESETS))
  _one_of("model.compute_dtype", c.model.compute_dtype, COMPUTE_DTYPES)
  _one_of("remat.policy", c.remat.policy, tuple(POLICIES))
  _one_of("remat.planner", c.remat.get("planner", "measure"), PLANNERS)
  # 'auto': the measuring planner chooses (MA-GC); otherwise it means nothing / none.
  _one_of("remat.offload", c.remat.get("offload", "none"), tuple(OFFLOAD_CHOICES) + ("auto",))
  _one_of("remat.cell_saves", c.remat.cell_saves, tuple(CELL_SAVES) + ("auto",))
  _auto_or_positive_int("remat.l", c.remat.l)
  _auto_or_positive_int("remat.s", c.remat.s)
  if c.remat.budget_gb is not None and c.remat.budget_gb <= 0:
    raise ConfigError(f"config.remat.budget_gb={c.remat.budget_gb} must be > 0 (or None)")
  if c.optim.micro_batch < 1:
    raise ConfigError(f"config.optim.micro_batch={c.optim.micro_batch} must be >= 1")
  if c.optim.global_batch % c.optim.micro_batch:
    raise ConfigError(f"config.optim.global_batch={c.optim.global_batch} must be a multiple "
                     f"of config.optim.micro_batch={c.optim.micro_batch}")
  for name in ("lr_llm", "lr_vision", "lr_projector", "weight_decay"):
    if c.optim[name] < 0:
      raise ConfigError(f"config.optim.{name}={c.optim[name]} must be >= 0")
  try:
    optim.check_memory_options(c.optim)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not 0 <= c.optim.warmup_frac < 1:
    raise ConfigError(f"config.optim.warmup_frac={c.optim.warmup_frac} must be in [0, 1)")
  if c.train.steps < 1:
    raise ConfigError(f"config.train.steps={c.train.steps} must be >= 1")
  if c.train.log_every < 1:
    raise ConfigError(f"config.train.log_every={c.train.log_every} must be >= 1")
  for name in ("data", "fsdp"):
    if c.mesh[name] != -1 and c.mesh[name] < 1:
      raise ConfigError(f"config.mesh.{name}={c.mesh[name]} must be >= 1 (or -1: the rest)")
  _at_least("mesh.seq", c.mesh.get("seq", 1), 1)
  _one_of("mesh.zero1", c.mesh.get("zero1", False), (False, True))
  _at_least("ckpt.every_steps", c.ckpt.every_steps, 1)
  # 0 would delete every checkpoint right after saving it: a rerun would start from step 0.
  _at_least("ckpt.max_to_keep", c.ckpt.max_to_keep, 1)
  if c.ckpt.keep_period is not None:
    _at_least("ckpt.keep_period", c.ckpt.keep_period, 1)
  _at_least("train.stop_at_step", c.train.stop_at_step, 0)
  _at_least("eval.every_steps", c.eval.every_steps, 0)
  _at_least("eval.batches", c.eval.batches, 0)
  for name in ("max_frames", "max_tokens", "worker_buffer_size"):
    _at_least(f"data.{name}", c.data[name], 1)
  _at_least("data.num_workers", c.data.num_workers, 0)
  if not c.data.fps > 0:
    raise ConfigError(f"config.data.fps={c.data.fps} must be > 0")
