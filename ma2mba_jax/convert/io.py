"""Saving and restoring a model as an Orbax checkpoint of its params plus its config.

Layout of a saved model directory:

    out_dir/params/             Orbax (StandardCheckpointer) checkpoint of the nnx.Param
                                state as a pure nested dict (e.g. params["embedding"])
    out_dir/model_config.json   {"format_version", "model_class", "config", "num_params"}
    out_dir/tokenizer.json      the tokenizer the model was trained with (added special
                                tokens included), when save_model is given it; with
                                tokenizer_config.json / special_tokens_map.json beside it
                                (data/tokenizer.py `save_tokenizer`)

Generic over models that follow one convention: `cls(config, *, rngs=nnx.Rngs(...))`
builds the model, `model.config` is a (possibly nested) frozen dataclass, and every piece
of state is an `nnx.Param`. Mamba2LM does; the video model can reuse this unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

FORMAT_VERSION = 1
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
# Classes named in model_config.json are imported only from this package.
_TRUSTED_PREFIX = "ma2mba_jax."


# --------------------------------------------------------------------------- config <-> json


def encode_config(value: Any) -> Any:
  """A config value (dataclasses, dtypes, tuples, inf included) -> JSON-safe data."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    fields = {f.name: encode_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return {"__dataclass__": qualified_name(type(value)), "fields": fields}
  if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
    return {"__dtype__": jnp.dtype(value).name}
  if isinstance(value, tuple):
    return {"__tuple__": [encode_config(v) for v in value]}
  if isinstance(value, list):
    return [encode_config(v) for v in value]
  if isinstance(value, dict):
    return {str(k): encode_config(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return {"__float__": repr(value)}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"cannot write config value {value!r} of type {type(value).__name__} "
                  f"to JSON")


def decode_config(data: Any) -> Any:
  """Inverse of `encode_config`."""
  if isinstance(data, list):
    return [decode_config(v) for v in data]
  if not isinstance(data, dict):
    return data
  if "__dataclass__" in data:
    cls = import_trusted(data["__dataclass__"])
    return cls(**{k: decode_config(v) for k, v in data["fields"].items()})
  if "__dtype__" in data:
    return jnp.dtype(data["__dtype__"])
  if "__tuple__" in data:
    return tuple(decode_config(v) for v in data["__tuple__"])
  if "__float__" in data:
    return float(data["__float__"])
  return {k: decode_config(v) for k, v in data.items()}


def qualified_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def import_trusted(name: str) -> type:
  module, _, qualname = name.partition(":")
  if not module.startswith(_TRUSTED_PREFIX):
    raise ValueError(f"{CONFIG_FILE} names class {name!r} outside {_TRUSTED_PREFIX}*; refusing "
                     f"to import it")
  obj: Any = importlib.import_module(module)
  for part in qualname.split("."):
    obj = getattr(obj, part)
  return obj


# --------------------------------------------------------------------------- save / restore


def save_model(model: nnx.Module, out_dir: str | Path, *, overwrite: bool = False,
               tokenizer: Any = None) -> Path:
  """Writes out_dir/params (Orbax) and out_dir/model_config.json (and, given a
  `tokenizers.Tokenizer`, out_dir/tokenizer.json and its HF config files); returns out_dir
  (absolute)."""
  out = Path(out_dir).absolute()
  params_dir = out / PARAMS_DIR
  if params_dir.exists() and not overwrite:
    raise FileExistsError(f"{params_dir} exists; pass overwrite=True (CLI: --overwrite) to "
                          f"replace it")
  _check_params_only(model)
  out.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, params, force=overwrite)
  meta = {"format_version": FORMAT_VERSION, "model_class": qualified_name(type(model)),
          "config": encode_config(model.config), "num_params": _count(params)}
  if jax.process_index() == 0:  # every process saves its shards above; one writes the rest
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  if tokenizer is not None and jax.process_index() == 0:
    from ma2mba_jax.data.tokenizer import save_tokenizer  # noqa: PLC0415
    save_tokenizer(tokenizer, str(out))
  return out


def saved_tokenizer(model_dir: str | Path) -> Path | None:
  """model_dir/tokenizer.json if save_model wrote one, else None (older exports)."""
  from ma2mba_jax.data.tokenizer import TOKENIZER_FILE  # noqa: PLC0415
  path = Path(model_dir) / TOKENIZER_FILE
  return path if path.is_file() else None


def read_model_config(model_dir: str | Path) -> tuple[type, Any]:
  """model_dir/model_config.json -> (model class, config)."""
  path = Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not a directory written by save_model "
                            f"(python -m ma2mba_jax.convert)")
  meta = json.loads(path.read_text())
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this code reads "
                     f"{FORMAT_VERSION}")
  return import_trusted(meta["model_class"]), decode_config(meta["config"])


def restore_params(model_dir: str | Path, abstract_params: Any) -> Any:
  """Restores model_dir/params into the structure (and shardings) of `abstract_params`.

  `abstract_params` is a pure dict of jax.ShapeDtypeStruct (with `.sharding` to place the
  arrays, e.g. from the trainer's sharded abstract state), as `nnx.to_pure_dict` gives.
  """
  params_dir = Path(model_dir).absolute() / PARAMS_DIR
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{params_dir} not found: not a directory written by save_model")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(params_dir, abstract_params)


def restore_model(model_dir: str | Path, **config_overrides) -> nnx.Module:
  """The model saved in model_dir, e.g. `restore_model(d, compute_dtype="bfloat16")`.

  The model is built abstractly (nnx.eval_shape, no random init) and filled from the
  checkpoint; `config_overrides` replace config fields that do not change parameter shapes
  (compute_dtype, ssd_impl, chunk_len, ...).
  """
  cls, config = read_model_config(model_dir)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  _check_params_only(abstract)
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restore_params(model_dir, target))
  return nnx.merge(graphdef, state)


def _check_params_only(model: nnx.Module) -> None:
  _, _, rest = nnx.split(model, nnx.Param, ...)
  others = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
  if others:
    raise ValueError(f"{type(model).__name__} holds state other than nnx.Param ({others[:5]}), "
                     f"which save_model / restore_model do not handle")


def _count(params: Any) -> int:
  return sum(math.prod(np.shape(a)) for a in jax.tree.leaves(params))
