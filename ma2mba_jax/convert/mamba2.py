"""Pretrained Mamba-2 weights from local files -> a ready `Mamba2LM`.

Two layouts are read:

  * "hf": transformers' `Mamba2ForCausalLM` directories: config.json (transformers'
    Mamba2Config: hidden_size, num_hidden_layers, state_size, head_dim, ...) and
    model.safetensors (or shards listed in model.safetensors.index.json; a
    pytorch_model.bin is read too when torch is installed). Tensor names
    backbone.embeddings.weight, backbone.layers.{i}.*, backbone.norm_f.weight, lm_head.weight.
  * "state-spaces": mamba_ssm's `MambaLMHeadModel` directories (state-spaces/mamba2-*):
    config.json (d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple, ...) and
    pytorch_model.bin (needs torch) or model.safetensors with the same tensor names:
    backbone.embedding.weight, backbone.layers.{i}.*, backbone.norm_f.weight, lm_head.weight.

Per layer both use mixer.{in_proj.weight [W, D], conv1d.weight [C, 1, K], conv1d.bias [C],
dt_bias [H], A_log [H], D [H], norm.weight [E], out_proj.weight [D, E]} and norm.weight [D]
(W = 2E + 2GN + H). Every tensor is checked: a missing, unexpected or misshapen tensor is an
error that names it.

With G > 1 groups the gated norm is grouped (E/G channels per group) as in mamba_ssm and in
transformers' CUDA-kernel path; transformers' pure-PyTorch fallback (5.x) normalises over
all E channels instead, so its logits differ from both for G > 1 (G = 1, the paper's models,
is unaffected; checked against transformers 5.17 on GPU: relative logit error 2.5e-7 for
G = 1, and 4.9e-7 for G = 2 once its norm is grouped).

Axis letters: D model width, E inner width, H heads, N state, G groups, C conv channels,
K conv kernel, V vocabulary, L layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2Config, Mamba2LM

FORMATS = ("auto", "hf", "state-spaces")

TORCH_MISSING = ('reading {path} needs PyTorch, which is an optional extra: install it with '
                 '`pip install -e ".[torch]"` (or save the weights as model.safetensors)')

# Embedding tensor name per layout; everything else is shared.
_EMBEDDING_NAME = {"hf": "backbone.embeddings.weight",
                   "state-spaces": "backbone.embedding.weight"}

# mamba_ssm ssm_cfg keys: read into Mamba2Config; that must keep mamba_ssm's default;
# that do not change the forward computation (kernel choice, parallelism, placement).
_SSM_CFG_USED = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                 "dt_min", "dt_max", "dt_init_floor", "A_init_range", "dt_limit", "d_ssm",
                 "activation"}
_SSM_CFG_FIXED = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                  "bias": False, "conv_bias": True}
_SSM_CFG_IGNORED = {"conv_init", "use_mem_eff_path", "layer_idx", "sequence_parallel",
                    "device", "dtype", "process_group"}


class CheckpointError(ValueError):
  """A checkpoint whose config or tensors do not fit a Mamba-2 LM."""


# --------------------------------------------------------------------------- configs


def detect_format(config: dict[str, Any]) -> str:
  """'hf' or 'state-spaces' from the keys of a config.json."""
  if "hidden_size" in config and "num_hidden_layers" in config:
    return "hf"
  if "d_model" in config and "n_layer" in config:
    return "state-spaces"
  raise CheckpointError("config.json is neither an HF Mamba2Config (hidden_size, "
                        "num_hidden_layers) nor a mamba_ssm config (d_model, n_layer)")


def _looks_like(config: dict[str, Any]) -> str | None:
  try:
    return detect_format(config)
  except CheckpointError:
    return None


def _json_float(value: Any, field: str) -> float:
  """A float from config.json, where infinity may be written as a number (Python's
  `Infinity`), a string ("inf", "Infinity") or an object wrapping such a string."""
  if isinstance(value, dict) and len(value) == 1:
    value = next(iter(value.values()))
  try:
    return float(value)
  except (TypeError, ValueError):
    raise CheckpointError(f"config.json: {field} holds {value!r}, not a number") from None


def _float_pair(value: Any, field: str) -> tuple[float, float]:
  _require(isinstance(value, (list, tuple)) and len(value) == 2,
           f"config.json: {field} must be a pair [lo, hi], got {value!r}")
  return (_json_float(value[0], field), _json_float(value[1], field))


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise CheckpointError(message)


def config_from_hf(cfg: dict[str, Any], **overrides) -> Mamba2Config:
  """transformers' Mamba2Config (as a dict) -> Mamba2Config.

  HF's vocab_size is the embedding's row count (already padded), so no padding is added.
  """
  _require(cfg.get("model_type", "mamba2") == "mamba2",
           f"config.json: model_type is {cfg.get('model_type')!r}, expected 'mamba2'")
  _require(not cfg.get("use_bias", False), "config.json: use_bias=true (biased in_proj / "
           "out_proj) is not supported")
  _require(cfg.get("use_conv_bias", True), "config.json: use_conv_bias=false is not supported")
  _require(cfg.get("rms_norm", True), "config.json: rms_norm=false is not supported")
  _require(not cfg.get("norm_before_gate", False),
           "config.json: norm_before_gate=true is not supported")
  _require(cfg.get("hidden_act", "silu") in ("silu", "swish"),
           f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
  config = Mamba2Config(
      d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
      vocab_size=cfg["vocab_size"], pad_vocab_to_multiple=1,
      d_state=cfg.get("state_size", 128), head_dim=cfg.get("head_dim", 64),
      expand=cfg.get("expand", 2), n_groups=cfg.get("n_groups", 1),
      d_conv=cfg.get("conv_kernel", 4), chunk_len=cfg.get("chunk_size", 256),
      dt_min=cfg.get("time_step_min", 0.001), dt_max=cfg.get("time_step_max", 0.1),
      dt_init_floor=cfg.get("time_step_floor", 1e-4),
      dt_limit=_float_pair(cfg.get("time_step_limit", (0.0, math.inf)), "time_step_limit"),
      norm_eps=cfg.get("layer_norm_epsilon", cfg.get("rms_norm_eps", 1e-5)),
      tie_embeddings=cfg.get("tie_word_embeddings", False), **overrides)
  if "num_heads" in cfg:
    _require(cfg["num_heads"] == config.n_heads,
             f"config.json: num_heads={cfg['num_heads']} but expand * hidden_size / head_dim "
             f"= {config.n_heads}")
  if "intermediate_size" in cfg:
    _require(cfg["intermediate_size"] == config.d_inner,
             f"config.json: intermediate_size={cfg['intermediate_size']} but expand * "
             f"hidden_size = {config.d_inner}")
  return config


def config_from_state_spaces(cfg: dict[str, Any], **overrides) -> Mamba2Config:
  """mamba_ssm's MambaConfig (as a dict) -> Mamba2Config; defaults are mamba_ssm's."""
  ssm = dict(cfg.get("ssm_cfg") or {})
  _require(ssm.get("layer", "Mamba1") == "Mamba2",
           f"config.json: ssm_cfg.layer is {ssm.get('layer', 'Mamba1 (default)')!r}, "
           f"expected 'Mamba2'")
  _require(not cfg.get("attn_layer_idx"), "config.json: hybrid models with attention layers "
           "(attn_layer_idx) are not supported")
  _require(not cfg.get("d_intermediate", 0), "config.json: d_intermediate > 0 (an MLP in every "
           "block) is not supported")
  _require(cfg.get("rms_norm", True), "config.json: rms_norm=false (LayerNorm) is not supported")
  expand = ssm.get("expand", 2)
  _require(ssm.get("d_ssm") in (None, expand * cfg["d_model"]),
           f"config.json: ssm_cfg.d_ssm={ssm.get('d_ssm')} (an SSM narrower than expand * "
           f"d_model, with a gated MLP beside it) is not supported")
  for key, supported in _SSM_CFG_FIXED.items():
    _require(ssm.get(key, supported) == supported,
             f"config.json: ssm_cfg.{key}={ssm.get(key)!r} is not supported (only "
             f"{supported!r})")
  _require(ssm.get("activation", "silu") in ("silu", "swish"),
           f"config.json: ssm_cfg.activation {ssm.get('activation')!r} is not supported")
  unknown = sorted(set(ssm) - _SSM_CFG_IGNORED - set(_SSM_CFG_FIXED) - _SSM_CFG_USED)
  _require(not unknown, f"config.json: unknown ssm_cfg keys {unknown}")
  return Mamba2Config(
      d_model=cfg["d_model"], n_layers=cfg["n_layer"], vocab_size=cfg["vocab_size"],
      pad_vocab_to_multiple=cfg.get("pad_vocab_size_multiple", 8),
      d_state=ssm.get("d_state", 128), head_dim=ssm.get("headdim", 64),
      expand=expand, n_groups=ssm.get("ngroups", 1),
      d_conv=ssm.get("d_conv", 4), chunk_len=ssm.get("chunk_size", 256),
      dt_min=ssm.get("dt_min", 0.001), dt_max=ssm.get("dt_max", 0.1),
      dt_init_floor=ssm.get("dt_init_floor", 1e-4),
      A_init_range=_float_pair(ssm.get("A_init_range", (1.0, 16.0)), "ssm_cfg.A_init_range"),
      dt_limit=_float_pair(ssm.get("dt_limit", (0.0, math.inf)), "ssm_cfg.dt_limit"),
      norm_eps=cfg.get("norm_epsilon", 1e-5),
      tie_embeddings=cfg.get("tie_embeddings", True), **overrides)


# --------------------------------------------------------------------------- tensor files


def _import_torch(path: Path):
  try:
    import torch  # noqa: PLC0415 (optional dependency, imported only for .bin files)
  except ImportError as e:
    raise ImportError(TORCH_MISSING.format(path=path)) from e
  return torch


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415
  return load_file(str(path))


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  torch = _import_torch(path)
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  return {name: t.detach().to(torch.float32).numpy() if t.is_floating_point()
          else t.detach().numpy() for name, t in state.items()}


def _read_sharded(index_path: Path, reader) -> dict[str, np.ndarray]:
  weight_map = json.loads(index_path.read_text())["weight_map"]
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(reader(index_path.parent / shard))
  return tensors


def read_tensors(directory: str | Path) -> tuple[dict[str, np.ndarray], Path]:
  """All tensors of a checkpoint directory, and the file (or index) they came from.

  Looks for, in order: model.safetensors.index.json, model.safetensors,
  pytorch_model.bin.index.json, pytorch_model.bin (the .bin files need torch).
  """
  directory = Path(directory)
  sources = [("model.safetensors.index.json", lambda p: _read_sharded(p, _read_safetensors)),
             ("model.safetensors", _read_safetensors),
             ("pytorch_model.bin.index.json", lambda p: _read_sharded(p, _read_torch_bin)),
             ("pytorch_model.bin", _read_torch_bin)]
  for name, reader in sources:
    if (directory / name).is_file():
      return reader(directory / name), directory / name
  raise FileNotFoundError(f"{directory}: no weights found (looked for "
                          f"{', '.join(name for name, _ in sources)})")


# --------------------------------------------------------------------------- tensors -> params


def expected_shapes(config: Mamba2Config, layout: str) -> dict[str, tuple[int, ...]]:
  """Checkpoint tensor name -> shape for `layout` ("hf" or "state-spaces")."""
  c = config
  shapes = {_EMBEDDING_NAME[layout]: (c.padded_vocab_size, c.d_model),
            "backbone.norm_f.weight": (c.d_model,)}
  for i in range(c.n_layers):
    p = f"backbone.layers.{i}."
    shapes.update({
        p + "norm.weight": (c.d_model,),
        p + "mixer.in_proj.weight": (c.d_in_proj, c.d_model),
        p + "mixer.conv1d.weight": (c.conv_dim, 1, c.d_conv),
        p + "mixer.conv1d.bias": (c.conv_dim,),
        p + "mixer.dt_bias": (c.n_heads,),
        p + "mixer.A_log": (c.n_heads,),
        p + "mixer.D": (c.n_heads,),
        p + "mixer.norm.weight": (c.d_inner,),
        p + "mixer.out_proj.weight": (c.d_model, c.d_inner),
    })
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (c.padded_vocab_size, c.d_model)
  return shapes


def _is_float(array: np.ndarray) -> bool:
  return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def tensor_problems(tensors: dict[str, np.ndarray], config: Mamba2Config,
                    layout: str) -> list[str]:
  """Every missing, unexpected, misshapen or non-float tensor, one line each."""
  expected = expected_shapes(config, layout)
  extra = set(tensors) - set(expected)
  tied_head = config.tie_embeddings and "lm_head.weight" in extra
  if tied_head:  # torch state dicts store the tied head under both names
    extra.discard("lm_head.weight")
  problems = []
  missing = sorted(set(expected) - set(tensors), key=_natural_key)
  if missing:
    problems.append(f"missing tensors: {', '.join(missing)}")
  if extra:
    problems.append(f"unexpected tensors: {', '.join(sorted(extra, key=_natural_key))}")
  for name in sorted(set(expected) & set(tensors), key=_natural_key):
    if tuple(tensors[name].shape) != expected[name]:
      problems.append(f"tensor {name}: expected shape {expected[name]}, got "
                      f"{tuple(tensors[name].shape)}")
    elif not _is_float(tensors[name]):
      problems.append(f"tensor {name}: dtype {tensors[name].dtype}, expected a floating "
                      "point type")
  embedding_name = _EMBEDDING_NAME[layout]
  if tied_head and not problems and not np.array_equal(tensors["lm_head.weight"],
                                                       tensors[embedding_name]):
    problems.append(f"tensor lm_head.weight differs from {embedding_name} although the "
                    f"model ties the embeddings")
  return problems


def check_tensors(tensors: dict[str, np.ndarray], config: Mamba2Config, layout: str) -> None:
  """Raises CheckpointError naming every missing, unexpected, misshapen or non-float
  tensor."""
  problems = tensor_problems(tensors, config, layout)
  if problems:
    raise CheckpointError(f"checkpoint does not match the {layout} Mamba-2 layout of "
                          f"{config}:\n  " + "\n  ".join(problems))


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in name.split(".")]


def tensors_to_params(tensors: dict[str, np.ndarray], config: Mamba2Config,
                      layout: str) -> dict[str, Any]:
  """Checked checkpoint tensors -> the pure-dict state of `Mamba2LM` (layers stacked on L)."""
  check_tensors(tensors, config, layout)
  dtype = np.dtype(config.param_dtype)

  def get(name: str) -> np.ndarray:
    return np.asarray(tensors[name], np.float32).astype(dtype)

  def stacked(suffix: str, transform=lambda a: a) -> np.ndarray:
    return np.stack([transform(get(f"backbone.layers.{i}.{suffix}"))
                     for i in range(config.n_layers)])

  params = {
      "embedding": get(_EMBEDDING_NAME[layout]),
      "final_norm": {"weight": get("backbone.norm_f.weight")},
      "layers": {
          "norm": {"weight": stacked("norm.weight")},
          "mixer": {
              "in_proj": {"kernel": stacked("mixer.in_proj.weight", np.transpose)},
              "conv_weight": stacked("mixer.conv1d.weight", lambda w: w[:, 0, :].T),  # [K, C]
              "conv_bias": stacked("mixer.conv1d.bias"),
              "dt_bias": stacked("mixer.dt_bias"),
              "A_log": stacked("mixer.A_log"),
              "D": stacked("mixer.D"),
              "norm": {"weight": stacked("mixer.norm.weight")},
              "out_proj": {"kernel": stacked("mixer.out_proj.weight", np.transpose)},
          },
      },
  }
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  return params


def params_to_tensors(params: dict[str, Any], config: Mamba2Config,
                      layout: str = "hf") -> dict[str, np.ndarray]:
  """The inverse of `tensors_to_params`: Mamba2LM parameters (a pure dict) -> checkpoint
  tensors of `layout` (float32; a tied head is not written, as transformers saves it)."""
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  layers, mixer = params["layers"], params["layers"]["mixer"]
  tensors = {_EMBEDDING_NAME[layout]: f32(params["embedding"]),
             "backbone.norm_f.weight": f32(params["final_norm"]["weight"])}
  for i in range(config.n_layers):
    p = f"backbone.layers.{i}."
    tensors.update({
        p + "norm.weight": f32(layers["norm"]["weight"][i]),
        p + "mixer.in_proj.weight": f32(np.asarray(mixer["in_proj"]["kernel"][i]).T),
        p + "mixer.conv1d.weight": f32(np.asarray(mixer["conv_weight"][i]).T[:, None, :]),
        p + "mixer.conv1d.bias": f32(mixer["conv_bias"][i]),
        p + "mixer.dt_bias": f32(mixer["dt_bias"][i]),
        p + "mixer.A_log": f32(mixer["A_log"][i]),
        p + "mixer.D": f32(mixer["D"][i]),
        p + "mixer.norm.weight": f32(mixer["norm"]["weight"][i]),
        p + "mixer.out_proj.weight": f32(np.asarray(mixer["out_proj"]["kernel"][i]).T),
    })
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = f32(np.asarray(params["lm_head"]["kernel"]).T)
  check_tensors(tensors, config, layout)  # fails only on a mapping bug
  return tensors


def hf_config(config: Mamba2Config, *, eos_token_id: int | None = None,
              pad_token_id: int | None = None, bos_token_id: int | None = None
              ) -> dict[str, Any]:
  """transformers' Mamba2Config (as a dict, for config.json) of `config`; `vocab_size` is
  the embedding's row count (the padded vocabulary), as HF checkpoints store it."""
  c = config
  return {
      "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
      "vocab_size": c.padded_vocab_size, "hidden_size": c.d_model,
      "num_hidden_layers": c.n_layers, "state_size": c.d_state, "head_dim": c.head_dim,
      "num_heads": c.n_heads, "expand": c.expand, "intermediate_size": c.d_inner,
      "n_groups": c.n_groups, "conv_kernel": c.d_conv, "chunk_size": c.chunk_len,
      "time_step_min": c.dt_min, "time_step_max": c.dt_max,
      "time_step_floor": c.dt_init_floor, "time_step_limit": list(c.dt_limit),
      "time_step_rank": "auto", "layer_norm_epsilon": c.norm_eps,
      "rms_norm": True, "norm_before_gate": False, "use_bias": False, "use_conv_bias": True,
      "hidden_act": "silu", "residual_in_fp32": True, "rescale_prenorm_residual": False,
      "initializer_range": 0.1, "use_cache": True,
      "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
      "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
      "bos_token_id": bos_token_id,
  }


def architecture_problems(want: Mamba2Config, got: Mamba2Config) -> list[str]:
  """'field: the model has X, the checkpoint Y' for every field that changes the
  parameters' shapes or the computation (embedding rows compared after padding; tying is
  checked on the tensors)."""
  problems = []
  for field in ("d_model", "n_layers", "d_state", "head_dim", "expand", "n_groups", "d_conv",
                "padded_vocab_size", "norm_eps", "dt_limit"):
    a, b = getattr(want, field), getattr(got, field)
    if a != b:
      what = "embedding rows (vocabulary, padded)" if field == "padded_vocab_size" else field
      problems.append(f"{what}: the model has {a!r}, the checkpoint {b!r}")
  return problems


def llm_params(path: str | Path, config: Mamba2Config) -> dict[str, Any]:
  """The parameters (pure dict, numpy) of the HF or state-spaces checkpoint directory
  `path` for a Mamba2LM of `config` (e.g. a preset's): the checkpoint's architecture must be
  `config`'s; CheckpointError names the directory and every field and tensor that is not."""
  got, layout = read_config(path)
  tensors, source = read_tensors(path)
  problems = architecture_problems(config, got) + tensor_problems(tensors, config, layout)
  if problems:
    raise CheckpointError(f"{path}: the {layout} Mamba-2 checkpoint ({source.name}) does not "
                          f"fit the model's LM:\n  " + "\n  ".join(problems))
  return tensors_to_params(tensors, config, layout)


def model_from_params(config: Mamba2Config, params: dict[str, Any]) -> Mamba2LM:
  """A Mamba2LM holding `params` (a pure dict as from `tensors_to_params`), no random init."""
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, _map_nested(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def _map_nested(fn, tree):
  if isinstance(tree, dict):
    return {k: _map_nested(fn, v) for k, v in tree.items()}
  return fn(tree)


# --------------------------------------------------------------------------- entry point


def read_config(directory: str | Path, format: str = "auto",  # noqa: A002 (CLI name)
                **overrides) -> tuple[Mamba2Config, str]:
  """config.json of a checkpoint directory -> (Mamba2Config, layout)."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  path = Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected a Mamba-2 checkpoint directory")
  raw = json.loads(path.read_text())
  layout = detect_format(raw) if format == "auto" else format
  if format != "auto" and _looks_like(raw) not in (None, layout):
    raise CheckpointError(f"{path} looks like the {_looks_like(raw)} layout, but "
                          f"format={format!r} was requested")
  build = config_from_hf if layout == "hf" else config_from_state_spaces
  try:
    return build(raw, **overrides), layout
  except KeyError as e:
    raise CheckpointError(f"{path}: missing key {e.args[0]!r} for the {layout} layout") from e


def load_mamba2(path: str | Path, *, format: str = "auto",  # noqa: A002 (CLI name)
                compute_dtype: Any = jnp.float32, ssd_impl: str = "auto") -> Mamba2LM:
  """A ready Mamba2LM from a local HF or state-spaces Mamba-2 checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors / pytorch_model.bin.
    format: "auto" (from config.json), "hf" or "state-spaces".
    compute_dtype: float32 or bfloat16 compute (parameters are float32 either way).
    ssd_impl: SSD backend (auto | xla | pallas | triton).

  Returns:
    Mamba2LM; `model(tokens int32 [B, T])` -> logits [B, T, V] f32.
  """
  config, layout = read_config(path, format, compute_dtype=compute_dtype, ssd_impl=ssd_impl)
  tensors, source = read_tensors(path)
  try:
    params = tensors_to_params(tensors, config, layout)
  except CheckpointError as e:
    raise CheckpointError(f"{source}: {e}") from None
  return model_from_params(config, params)
