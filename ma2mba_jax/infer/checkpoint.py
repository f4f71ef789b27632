"""Loading a trained model and its tokenizer for inference.

`--checkpoint` may be:
  * a trainer workdir: the model is WORKDIR/model;
  * a model export (a folder with model_config.json, e.g. WORKDIR/model).
The tokenizer is, in this order: `--tokenizer`; the one saved with the export
(MODEL/tokenizer.json: the tokenizer training used, its added special tokens included);
for older exports without one, the one the workdir's config.json names (data.tokenizer,
else <data.synthetic_dir>/tokenizer.json; relative paths are taken from the current
directory, as the trainer did, then from the workdir's parent), with the chat template's
missing special tokens appended when that config had data.add_special_tokens (as the
trainer did; so also for a `--tokenizer` file).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from ma2mba_jax.convert import io as model_io
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.kernels.ssd.registry import resolve_impl
from ma2mba_jax.models.video_lm import VideoMa2mba

MODEL_EXPORT = "model"  # the trainer's export folder inside a workdir
TRAIN_CONFIG = "config.json"


def _train_config(workdir: str) -> dict | None:
  """A trainer workdir's config.json, or None without one."""
  path = os.path.join(workdir, TRAIN_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


def adds_special_tokens(workdir: str) -> bool:
  """Whether the run in `workdir` appended the chat template's special tokens
  (data.add_special_tokens in its config.json)."""
  config = _train_config(workdir) or {}
  return bool((config.get("data") or {}).get("add_special_tokens", False))


def _tokenizer_from_config(workdir: str) -> str | None:
  """The tokenizer path a trainer workdir's config.json names, or None without one."""
  path = os.path.join(workdir, TRAIN_CONFIG)
  config = _train_config(workdir)
  if config is None:
    return None
  data = config.get("data") or {}
  if data.get("tokenizer"):
    field, candidate = "data.tokenizer", data["tokenizer"]
  elif data.get("synthetic_dir"):
    field = "data.synthetic_dir"
    candidate = os.path.join(data["synthetic_dir"], "tokenizer.json")
  else:
    raise ValueError(f"{path}: neither data.tokenizer nor data.synthetic_dir is set; pass "
                     "--tokenizer")
  if os.path.isabs(candidate):
    tried = [candidate]
  else:
    tried = [os.path.abspath(candidate),
             os.path.join(os.path.dirname(os.path.abspath(workdir)), candidate)]
  for option in tried:
    if os.path.isfile(option):
      return option
  raise FileNotFoundError(f"{path}: the tokenizer from {field} is not at "
                          f"{' or '.join(tried)}; pass --tokenizer")


def locate(checkpoint: str) -> tuple[str, str]:
  """-> (model export folder, its workdir)."""
  checkpoint = os.fspath(checkpoint)
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint} not found (expected a trainer workdir "
                            f"or a model export folder)")
  export = os.path.join(checkpoint, MODEL_EXPORT)
  if os.path.isfile(os.path.join(export, model_io.CONFIG_FILE)):
    model_dir, workdir = export, checkpoint
  elif os.path.isfile(os.path.join(checkpoint, model_io.CONFIG_FILE)):
    model_dir, workdir = checkpoint, os.path.dirname(os.path.abspath(checkpoint))
  else:
    raise FileNotFoundError(
        f"{checkpoint}: neither {MODEL_EXPORT}/{model_io.CONFIG_FILE} (a trainer workdir) nor "
        f"{model_io.CONFIG_FILE} (a model export) is there; has training finished?")
  return model_dir, workdir


def resolve(checkpoint: str, tokenizer: str = "") -> tuple[str, str]:
  """-> (model export folder, tokenizer.json path); errors name what is missing."""
  model_dir, workdir = locate(checkpoint)
  if not tokenizer:
    saved = model_io.saved_tokenizer(model_dir)
    tokenizer = str(saved) if saved else ""
  if not tokenizer:
    tokenizer = _tokenizer_from_config(workdir) or ""
  if not tokenizer:
    raise ValueError(f"{checkpoint}: the export has no tokenizer.json and no {TRAIN_CONFIG} "
                     "names the tokenizer; pass --tokenizer")
  return model_dir, tokenizer


# Path parts under which a module's parameters are stacked along a leading layer axis.
STACKED = ("layers", "unused_layers")


def cast_matrices(model: nnx.Module, dtype: Any) -> nnx.Module:
  """The model with every matrix parameter (2 or more dimensions per layer) stored in
  `dtype` (e.g. bfloat16 to halve weight memory); vectors (norms, biases, A_log, D,
  dt_bias) stay f32, also inside the layer stacks, where they are [L, n]."""
  graphdef, state = nnx.split(model)

  def cast(path, a):
    per_layer_ndim = a.ndim - any(str(part) in STACKED for part in path)
    return a.astype(dtype) if per_layer_ndim >= 2 else a

  state = jax.tree_util.tree_map_with_path(
      lambda path, a: cast(tuple(getattr(k, "key", getattr(k, "name", k)) for k in path), a),
      state)
  return nnx.merge(graphdef, state)


# The SSD backend that inference gives a checkpoint saved with ssd_impl "auto", per platform
# (elsewhere "auto" stays: kernels/ssd/registry picks). On a GPU the Pallas kernels, with
# their tuned forward settings, run the frame step's LM 1.2-1.8% faster than jax-triton's,
# and the decode loop after them 2.5-4.3% faster (H100, 3.1B, two calls: decode medians
# 406.3-411.5 against 393.2-400.3 tokens/s; BENCHMARKS.md, "Prefill and decoding, session
# 16"). Training keeps "auto" (the registry's order: jax-triton first on a GPU).
INFERENCE_AUTO_SSD = {"gpu": "pallas"}


def inference_ssd_impl(saved: str, requested: str = "", platform: str | None = None) -> str:
  """The SSD backend a checkpoint runs with for inference: `requested` if given (checked by
  kernels/ssd/registry.resolve_impl, as `ssd` checks it), else the checkpoint's `saved`
  one, where "auto" becomes INFERENCE_AUTO_SSD's pick for `platform` (default: JAX's)."""
  if requested:
    resolve_impl(requested)
    return requested
  if saved != "auto":
    return saved
  return INFERENCE_AUTO_SSD.get(platform or jax.default_backend(), saved)


def load(checkpoint: str, *, tokenizer: str = "", compute_dtype: str = "",
         param_dtype: str = "", ssd_impl: str = "") -> tuple[VideoMa2mba, tokenizers.Tokenizer]:
  """The VideoMa2mba and tokenizer of a checkpoint (see the module docstring).

  compute_dtype: '' keeps the checkpoint's; 'float32' | 'bfloat16' overrides it.
  param_dtype: '' keeps f32 weights; 'bfloat16' stores the matrices in bf16.
  ssd_impl: '' keeps the checkpoint's SSD backend, its "auto" read as inference's pick
  (`inference_ssd_impl`: pallas on a GPU); else a backend name `ssd` accepts (checked here,
  by kernels/ssd/registry.resolve_impl, before anything is read).
  """
  if ssd_impl:
    resolve_impl(ssd_impl)
  model_dir, tokenizer_path = resolve(checkpoint, tokenizer)
  add_missing = adds_special_tokens(locate(checkpoint)[1])
  overrides = {"compute_dtype": compute_dtype} if compute_dtype else {}
  saved_impl = getattr(model_io.read_model_config(model_dir)[1], "ssd_impl", "auto")
  impl = inference_ssd_impl(saved_impl, ssd_impl)
  if impl != saved_impl:
    overrides["ssd_impl"] = impl
  model = model_io.restore_model(model_dir, **overrides)
  if not isinstance(model, VideoMa2mba):
    raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a VideoMa2mba")
  tok = load_tokenizer(tokenizer_path, add_missing=add_missing)
  rows = model.llm.config.padded_vocab_size
  if vocab_size(tok) > rows:
    raise ValueError(f"{tokenizer_path} has {vocab_size(tok)} ids but the model in "
                     f"{model_dir} embeds only {rows}: not this model's tokenizer")
  if param_dtype:
    model = cast_matrices(model, jnp.dtype(param_dtype))
  return model, tok
