"""A workdir remembers the config (and the `init_from` export) that made it.

    workdir/config.json   the config of the run, as JSON (written once every input is checked)
    workdir/inputs.json   what the config's files were: the identity of the init_from export

A rerun in the same workdir resumes its state, which is only right if it is the same run:
`check` compares the new config with the remembered one and stops, naming every field that
differs, unless the field is one a resumed run may change (FREE_FIELDS: logging, checkpoint
and eval cadence, memory / speed settings that leave the math alone; `train.steps` may
grow) or the user allows it with `--config.train.allow_changes=field1,field2` (a section
name allows all its fields).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections
from absl import logging

from ma2mba_jax.convert import io as model_io
from ma2mba_jax.train import checkpoint
from ma2mba_jax.errors import ConfigError, WorkdirConflictError

CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"
MODEL_EXPORT = "model"
# The pseudo-field naming the init_from export's identity in messages and allow_changes.
INIT_FROM_EXPORT = "init_from"

# Fields a resumed run may change: they do not change what the run computes (or only its
# speed and memory). A section name covers all its fields.
FREE_FIELDS = ("train.log_every", "train.stop_at_step", "train.allow_changes", "ckpt", "eval",
               "remat", "mesh", "optim.state_memory", "model.ssd_impl",
               "model.frames_per_microbatch",
               "data.worker_buffer_size", "data.validate_media")
GROWING_FIELDS = ("train.steps",)


def _matches(field: str, patterns: tuple[str, ...] | list[str]) -> bool:
  return any(field == p or field.startswith(p + ".") for p in patterns)


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{'optim.lr_llm': 4e-05, ...}: the config's leaves as JSON values, by dotted name."""
  tree = json.loads(config.to_json()) if hasattr(config, "to_json") else config
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict) and node:
      for key, value in node.items():
        walk(f"{prefix}{key}.", value)
    else:
      out[prefix[:-1]] = node
  walk("", tree)
  return out


def init_from_dir(init_from: str) -> str:
  """The model directory `init_from` names: a previous stage's workdir/model, or the
  directory itself (a converted checkpoint); '' when unset."""
  if not init_from:
    return ""
  export = os.path.join(init_from, MODEL_EXPORT)
  if os.path.isfile(os.path.join(export, model_io.CONFIG_FILE)):
    return export
  return init_from


def check_init_from(init_from: str) -> str:
  """init_from_dir(), checked to hold a model written by save_model; ConfigError names it."""
  src = init_from_dir(init_from)
  if src and not os.path.isfile(os.path.join(src, model_io.CONFIG_FILE)):
    raise ConfigError(f"config.init_from={init_from!r}: neither {src} nor {src}/{MODEL_EXPORT} "
                      f"holds a model ({model_io.CONFIG_FILE}); give a finished stage's workdir "
                      f"or a converted checkpoint (python -m ma2mba_jax.convert)")
  return src


def export_identity(model_dir: str) -> str | None:
  """A hash of a model directory's model_config.json and of every file's name, size and
  modification time: it changes whenever the model is written again. None if absent."""
  if not model_dir or not os.path.isfile(os.path.join(model_dir, model_io.CONFIG_FILE)):
    return None
  digest = hashlib.sha256()
  with open(os.path.join(model_dir, model_io.CONFIG_FILE), "rb") as f:
    digest.update(f.read())
  for root, dirs, files in os.walk(model_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      stat = os.stat(path)
      digest.update(f"{os.path.relpath(path, model_dir)}:{stat.st_size}:"
                    f"{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


def inputs_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {INIT_FROM_EXPORT: export_identity(init_from_dir(config.init_from))}


def has_state(workdir: str) -> bool:
  """Whether the workdir holds something a rerun would continue: a checkpoint or an export."""
  if checkpoint.latest_saved_step(workdir) is not None:
    return True
  return os.path.isfile(os.path.join(workdir, MODEL_EXPORT, model_io.CONFIG_FILE))


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  return [f.strip() for f in str(config.train.get("allow_changes", "") or "").split(",")
          if f.strip()]


def changes(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """What differs between `config` and the run that made `workdir` ('field: old -> new'),
  leaving out what a resumed run may change; [] for a workdir without state."""
  if not has_state(workdir):
    return []
  old = _read_json(os.path.join(workdir, CONFIG_FILE))
  if old is None:
    return [f"{CONFIG_FILE}: missing (the workdir holds checkpoints of an unknown config)"]
  old, new = flat_config(old), flat_config(config)
  allowed = allowed_changes(config)
  out = []
  for field in sorted(old.keys() & new.keys()):  # a field added or removed since: not compared
    before, after = old[field], new[field]
    if before == after or _matches(field, FREE_FIELDS) or _matches(field, allowed):
      continue
    if field in GROWING_FIELDS and isinstance(before, int) and after > before:
      continue
    note = " (may only grow)" if field in GROWING_FIELDS else ""
    out.append(f"{field}: {before!r} -> {after!r}{note}")
  old_inputs = _read_json(os.path.join(workdir, INPUTS_FILE)) or {}
  before = old_inputs.get(INIT_FROM_EXPORT)
  after = inputs_record(config)[INIT_FROM_EXPORT]
  if before is not None and before != after and not _matches(INIT_FROM_EXPORT, allowed):
    what = "was written again since" if after else "is gone"
    out.append(f"{INIT_FROM_EXPORT}: the model in {init_from_dir(config.init_from) or '-'} "
               f"{what} (this run started from the earlier one)")
  return out


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises WorkdirConflictError naming the differences `changes` finds."""
  found = changes(config, workdir)
  if not found:
    return
  fields = ",".join(sorted({c.split(":")[0] for c in found}))
  raise WorkdirConflictError(
      f"{workdir} holds a run with other settings: {'; '.join(found)}. Use a fresh --workdir,"
      f" or continue this run with the change: --config.train.allow_changes={fields}")


def _write_json_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def remember(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json and inputs.json (call once every input is checked)."""
  os.makedirs(workdir, exist_ok=True)
  _write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))
  _write_json_atomic(os.path.join(workdir, INPUTS_FILE),
                     json.dumps(inputs_record(config), indent=2))
  logging.info("config of this run: %s", os.path.join(workdir, CONFIG_FILE))
