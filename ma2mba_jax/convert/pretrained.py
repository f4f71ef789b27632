"""The starting weights of a fresh training stage from local Hugging Face checkpoints.

    config.model.vision_init   an HF CLIP or SigLIP vision directory (config.json +
                               safetensors), e.g. openai/clip-vit-large-patch14-336
    config.model.llm_init      an HF `Mamba2ForCausalLM` or state-spaces Mamba-2 directory,
                               e.g. state-spaces/mamba2-2.7b

The trainer calls `apply_pretrained` on the randomly initialised parameters of a stage that
starts fresh (a stage that resumes from its own checkpoint never gets here); `init_from` is
applied after it. The architecture is the preset's (config.model.preset): a checkpoint must
have that architecture, and every field and tensor that does not fit is named in one
ConfigError together with the config field and the directory. The projector always starts
random (stage 1 trains it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.errors import ConfigError

# config.model field -> parameter group it initialises.
FIELDS = {"vision_init": "vision", "llm_init": "llm"}


def pretrained_dirs(config) -> dict[str, str]:
  """{group: directory} for the fields that are set ('vision', 'llm')."""
  model = config.model
  return {group: str(model.get(field, "") or "") for field, group in FIELDS.items()
          if model.get(field, "")}


def _field(group: str) -> str:
  return "config.model." + next(f for f, g in FIELDS.items() if g == group)


def load_group(group: str, path: str, model_cfg: Any) -> dict[str, Any]:
  """The parameters (numpy pure dict) of group 'vision' or 'llm' from checkpoint `path`,
  for the model of `model_cfg` (a VideoConfig); ConfigError naming field, directory and
  what does not fit."""
  field = _field(group)
  if not os.path.isdir(path):
    raise ConfigError(f"{field}={path!r}: no such directory (expected a local HF "
                      f"{'CLIP or SigLIP vision' if group == 'vision' else 'Mamba-2'} "
                      "checkpoint: config.json + model.safetensors)")
  try:
    if group == "vision":
      return vision_ckpt.vision_params(path, model_cfg.vision_config)
    return mamba2_ckpt.llm_params(path, model_cfg.llm_config)
  except (vision_ckpt.CheckpointError, mamba2_ckpt.CheckpointError, FileNotFoundError,
          ImportError) as e:
    raise ConfigError(f"{field}={path!r}: {e}") from None


def _flat(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _place(loaded: Any, current: Any, shardings: Any, where: str) -> Any:
  """`loaded` (numpy) as arrays of `current`'s dtypes, placed with `shardings`."""
  want, got = _flat(current), _flat(loaded)
  mismatched = sorted(k for k in set(want) | set(got)
                      if k not in want or k not in got or np.shape(want[k]) != np.shape(got[k]))
  if mismatched:  # a mapping bug: the checks above compare architectures and tensors
    raise AssertionError(f"{where}: converted parameters do not match the model at "
                         f"{mismatched[:8]}")

  def put(array, cur, sharding):
    array = np.asarray(array, dtype=cur.dtype)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  return jax.tree.map(put, loaded, current, shardings)


def apply_pretrained(config, model_cfg: Any, params: dict[str, Any],
                     shardings: dict[str, Any]) -> dict[str, Any]:
  """`params` (the VideoMa2mba's pure-dict parameters, sharded by `shardings`) with the
  groups named by config.model.vision_init / llm_init replaced by those checkpoints'."""
  dirs = pretrained_dirs(config)
  if not dirs:
    return params
  params = dict(params)
  for group, path in dirs.items():
    loaded = load_group(group, path, model_cfg)
    params[group] = _place(loaded, params[group], shardings[group], f"{_field(group)}={path}")
    what = "vision encoder" if group == "vision" else "LM"
    logging.info("%s=%s: the %s's parameters", _field(group), path, what)
    if jax.process_index() == 0:
      print(f"[stage {config.stage}] {what} from {path}", flush=True)
  if config.get("init_from"):
    logging.info("config.init_from=%s is applied after %s and replaces what it holds",
                 config.init_from, ", ".join(_field(g) for g in dirs))
  return params
