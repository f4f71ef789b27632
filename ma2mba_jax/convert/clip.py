"""Load a CLIP or SigLIP vision tower from a local Hugging Face checkpoint into
`VisionEncoder`, and write one back (the inverse, for `--export-hf`).

A checkpoint directory holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`). Tensor names are those of transformers'
`CLIPVisionModel` / `SiglipVisionModel` (`vision_model.*`), of `CLIPModel` / `SiglipModel`
(the same `vision_model.*` plus `text_model.*` and projections, which are ignored; the config
keeps the vision fields under `vision_config`), or the same names without the
`vision_model.` prefix (transformers 5's `CLIPVisionModel.save_pretrained`). Names with a
prefix before `vision_model.` (a tower saved inside a larger model) load too. The kind
(CLIP or SigLIP) is config.json's `model_type`. `preprocessor_config.json`, when present,
supplies the image mean/std.

Name and layout mapping (HF weight [out, in] -> NNX kernel [in, out]):
  embeddings.patch_embedding.weight [D, 3, P, P]   -> patch_embed/kernel [P, P, 3, D]
  embeddings.patch_embedding.bias [D]   (SigLIP)    -> patch_embed/bias [D]
  embeddings.class_embedding [D]        (CLIP)      -> class_embed [D]
  embeddings.position_embedding.weight [T, D]       -> pos_embed [T, D]
  pre_layrnorm.{weight,bias}            (CLIP)      -> pre_norm/{scale,bias}
  encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*   -> layers/attn/{q,k,v,out}/* [i]
  encoder.layers.{i}.layer_norm{1,2}.*              -> layers/norm{1,2}/* [i]
  encoder.layers.{i}.mlp.fc{1,2}.*                  -> layers/mlp/fc{1,2}/* [i]
    (layers i >= n_layers_run, never run for features, go to unused_layers/* [i - n_run])
  post_layernorm.{weight,bias}                      -> post_norm/{scale,bias}
  head.*                                (SigLIP)    not built (the attention-pooling head);
                                                    ignored on load, not written on export
Parameters are stored in float32 whatever the checkpoint's dtype.

Axis legend: D width, P patch side, T positions, M MLP width, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from ma2mba_jax.models.vision import (ACTIVATIONS, CLIP_MEAN, CLIP_STD, SIGLIP_MEAN,
                                      SIGLIP_STD, VisionConfig, VisionEncoder)

_ANCHOR = "embeddings.patch_embedding.weight"
_PREFIX = "vision_model."
# Buffers some transformers versions save; not parameters.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
# SigLIP's attention-pooling head (not built: features come from a hidden state).
_IGNORED_PREFIXES = ("head.",)

KINDS = ("clip", "siglip")
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for fields a config.json
# leaves out.
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
_DEFAULT_STATS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
# Activation names that compute the same function.
_SAME_ACTIVATION = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it is loaded into."""


def hf_kind(hf_config: dict[str, Any]) -> str:
  """'clip' or 'siglip' from a config.json's model_type (CLIP when it names neither)."""
  model_type = str(hf_config.get("model_type", "")).lower()
  inner = str((hf_config.get("vision_config") or {}).get("model_type", "")).lower()
  if "siglip" in model_type or "siglip" in inner:
    if "siglip2" in model_type or "siglip2" in inner:
      raise CheckpointError(f"model_type {model_type!r}: SigLIP 2 (NaFlex patches) is not "
                            "supported; SigLIP and CLIP are")
    return "siglip"
  return "clip"


def vision_config_from_hf(hf_config: dict[str, Any], *, name: str = "hf-vision",
                          image_mean=None, image_std=None) -> VisionConfig:
  """A VisionConfig from a CLIPVisionConfig / SiglipVisionConfig dict, or a CLIPConfig /
  SiglipConfig dict (its `vision_config`). mean/std default to the kind's."""
  kind = hf_kind(hf_config)
  hf = dict(_HF_DEFAULTS[kind])
  hf.update(hf_config.get("vision_config") or hf_config)
  act = hf["hidden_act"]
  if act not in ACTIVATIONS:
    raise CheckpointError(f"unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
  if int(hf.get("num_channels", 3)) != 3:
    raise CheckpointError(f"num_channels={hf['num_channels']}: only RGB (3) is supported")
  mean, std = _DEFAULT_STATS[kind]
  clip = kind == "clip"
  return VisionConfig(name=name, image_size=int(hf["image_size"]),
                      patch_size=int(hf["patch_size"]), width=int(hf["hidden_size"]),
                      n_layers=int(hf["num_hidden_layers"]),
                      n_heads=int(hf["num_attention_heads"]),
                      mlp_dim=int(hf["intermediate_size"]), activation=act, class_token=clip,
                      pre_norm=clip, patch_bias=not clip,
                      norm_eps=float(hf["layer_norm_eps"]),
                      image_mean=tuple(mean if image_mean is None else image_mean),
                      image_std=tuple(std if image_std is None else image_std))


def config_kind(cfg: VisionConfig) -> str:
  """'clip' or 'siglip': the HF model whose layout the config has; CheckpointError if none."""
  if cfg.class_token and cfg.pre_norm and not cfg.patch_bias:
    return "clip"
  if not cfg.class_token and not cfg.pre_norm and cfg.patch_bias:
    return "siglip"
  raise CheckpointError(f"vision {cfg.name}: class_token={cfg.class_token}, pre_norm="
                        f"{cfg.pre_norm}, patch_bias={cfg.patch_bias} is neither CLIP's layout "
                        "(True, True, False) nor SigLIP's (False, False, True)")


def hf_config_from_vision(cfg: VisionConfig) -> dict[str, Any]:
  """The config.json (CLIPVisionConfig or SiglipVisionConfig) of an encoder config."""
  kind = config_kind(cfg)
  act = cfg.activation
  if kind == "siglip" and _SAME_ACTIVATION.get(act, act) == "gelu_tanh":
    act = "gelu_pytorch_tanh"  # the name transformers' SigLIP configs use
  out = {
      "model_type": "clip_vision_model" if kind == "clip" else "siglip_vision_model",
      "architectures": ["CLIPVisionModel" if kind == "clip" else "SiglipVisionModel"],
      "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_channels": 3, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
      "hidden_act": act, "layer_norm_eps": cfg.norm_eps, "attention_dropout": 0.0,
      "torch_dtype": "float32",
  }
  if kind == "clip":
    out.update(projection_dim=512, initializer_range=0.02, initializer_factor=1.0)
  else:
    out["vision_use_head"] = False  # the pooling head is not part of our encoder
  return out


def preprocessor_config(cfg: VisionConfig) -> dict[str, Any]:
  """A preprocessor_config.json with the encoder's image size and mean/std."""
  kind = config_kind(cfg)
  return {"image_processor_type": "CLIPImageProcessor" if kind == "clip"
          else "SiglipImageProcessor",
          "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": list(cfg.image_mean),
          "image_std": list(cfg.image_std),
          "size": ({"shortest_edge": cfg.image_size} if kind == "clip"
                   else {"height": cfg.image_size, "width": cfg.image_size}),
          **({"do_center_crop": True,
              "crop_size": {"height": cfg.image_size, "width": cfg.image_size}}
             if kind == "clip" else {})}


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _tensor_files(ckpt_dir: str) -> list[str]:
  single = os.path.join(ckpt_dir, "model.safetensors")
  index = os.path.join(ckpt_dir, "model.safetensors.index.json")
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    shards = sorted(set(_read_json(index)["weight_map"].values()))
    return [os.path.join(ckpt_dir, s) for s in shards]
  raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json "
                          "(a PyTorch .bin checkpoint must be re-saved as safetensors first)")


def _vision_prefix(names: list[str], ckpt_dir: str) -> str:
  """The prefix before `embeddings.patch_embedding.weight` ('' without `vision_model.`)."""
  prefixes = sorted({n[: -len(_ANCHOR)] for n in names if n.endswith(_ANCHOR)
                     and (n == _ANCHOR or n[: -len(_ANCHOR)].endswith("."))})
  if not prefixes:
    raise CheckpointError(f"{ckpt_dir}: no tensor named '[...{_PREFIX}]{_ANCHOR}'; is this a "
                          "CLIP or SigLIP vision checkpoint?")
  if len(prefixes) > 1:
    tower = [p for p in prefixes if p.endswith(_PREFIX)]
    if len(tower) != 1:
      found = ", ".join(p + _ANCHOR for p in prefixes)
      raise CheckpointError(f"{ckpt_dir}: several vision towers ({found}); which one is "
                            "meant is ambiguous")
    prefixes = tower
  return prefixes[0]


def read_vision_tensors(ckpt_dir: str) -> dict[str, np.ndarray]:
  """The vision tensors of a checkpoint, keyed by their name after `vision_model.` (or
  after nothing, for checkpoints saved without that prefix)."""
  files = _tensor_files(ckpt_dir)
  names: dict[str, list[str]] = {}
  for file in files:
    with safe_open(file, framework="np") as f:
      names[file] = list(f.keys())
  prefix = _vision_prefix([n for keys in names.values() for n in keys], ckpt_dir)
  out: dict[str, np.ndarray] = {}
  for file, keys in names.items():
    with safe_open(file, framework="np") as f:
      for n in keys:
        if n.startswith(prefix):
          out[n[len(prefix):]] = f.get_tensor(n)
  return out


def _expected_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
  """HF name (after `vision_model.`) -> HF shape, for every tensor the encoder needs."""
  d, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  shapes = {
      "embeddings.patch_embedding.weight": (d, 3, p, p),
      "embeddings.position_embedding.weight": (cfg.n_positions, d),
      "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
  }
  if cfg.patch_bias:
    shapes["embeddings.patch_embedding.bias"] = (d,)
  if cfg.class_token:
    shapes["embeddings.class_embedding"] = (d,)
  if cfg.pre_norm:
    shapes["pre_layrnorm.weight"] = shapes["pre_layrnorm.bias"] = (d,)
  for i in range(cfg.n_layers):
    layer = f"encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
      shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
    for norm in ("layer_norm1", "layer_norm2"):
      shapes[f"{layer}{norm}.weight"] = (d,)
      shapes[f"{layer}{norm}.bias"] = (d,)
    shapes[f"{layer}mlp.fc1.weight"] = (m, d)
    shapes[f"{layer}mlp.fc1.bias"] = (m,)
    shapes[f"{layer}mlp.fc2.weight"] = (d, m)
    shapes[f"{layer}mlp.fc2.bias"] = (d,)
  return shapes


def is_float(array: np.ndarray) -> bool:
  """Whether an array holds floating point numbers (bfloat16 included)."""
  return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def tensor_problems(tensors: dict[str, np.ndarray], cfg: VisionConfig) -> list[str]:
  """Every missing, unexpected, mis-shaped or non-float vision tensor, one line each."""
  expected = _expected_shapes(cfg)
  problems = []
  for name, shape in expected.items():
    if name not in tensors:
      problems.append(f"missing vision_model.{name} (expected shape {list(shape)})")
    elif tuple(tensors[name].shape) != shape:
      problems.append(f"vision_model.{name}: expected shape {list(shape)}, got "
                      f"{list(tensors[name].shape)}")
    elif not is_float(tensors[name]):
      problems.append(f"vision_model.{name}: dtype {tensors[name].dtype}, expected a "
                      "floating point type")
  for name in sorted(set(tensors) - set(expected)):
    if not name.endswith(_IGNORED_SUFFIXES) and not name.startswith(_IGNORED_PREFIXES):
      problems.append(f"unexpected vision_model.{name} {list(tensors[name].shape)} (the "
                      f"config says {cfg.n_layers} layers of width {cfg.width})")
  return problems


def check_tensors(tensors: dict[str, np.ndarray], cfg: VisionConfig, where: str = "") -> None:
  """Raises CheckpointError naming every missing, unexpected, mis-shaped or non-float
  vision tensor."""
  problems = tensor_problems(tensors, cfg)
  if problems:
    raise CheckpointError(f"{where}: checkpoint does not match the config:\n  "
                          + "\n  ".join(problems))


def to_nnx_params(tensors: dict[str, np.ndarray], cfg: VisionConfig) -> dict[str, Any]:
  """HF vision tensors (checked) -> the nested dict of VisionEncoder parameters (float32).

  HF layers 0 .. n_layers_run-1 become `layers`, the rest `unused_layers` (never run).
  """
  f32 = lambda a: np.asarray(a, np.float32)

  def stack(layer_ids: range) -> dict[str, Any]:
    """The layers `layer_ids` as one dict of [n, ...] arrays."""
    prefixes = [f"encoder.layers.{i}." for i in layer_ids]
    get = lambda suffix, fn=f32: np.stack([fn(tensors[p + suffix]) for p in prefixes])
    linear = lambda hf: {"kernel": get(f"{hf}.weight", lambda w: f32(w).T),  # [n, in, out]
                         "bias": get(f"{hf}.bias")}
    norm = lambda hf: {"scale": get(f"{hf}.weight"), "bias": get(f"{hf}.bias")}
    return {
        "norm1": norm("layer_norm1"),
        "attn": {"q": linear("self_attn.q_proj"), "k": linear("self_attn.k_proj"),
                 "v": linear("self_attn.v_proj"), "out": linear("self_attn.out_proj")},
        "norm2": norm("layer_norm2"),
        "mlp": {"fc1": linear("mlp.fc1"), "fc2": linear("mlp.fc2")},
    }

  params = {
      # [D, 3, P, P] -> [P, P, 3, D] (HWIO)
      "patch_embed": {"kernel": f32(tensors["embeddings.patch_embedding.weight"])
                                 .transpose(2, 3, 1, 0)},
      "pos_embed": f32(tensors["embeddings.position_embedding.weight"]),
      "post_norm": {"scale": f32(tensors["post_layernorm.weight"]),
                    "bias": f32(tensors["post_layernorm.bias"])},
  }
  if cfg.patch_bias:
    params["patch_embed"]["bias"] = f32(tensors["embeddings.patch_embedding.bias"])
  if cfg.class_token:
    params["class_embed"] = f32(tensors["embeddings.class_embedding"])
  if cfg.pre_norm:
    params["pre_norm"] = {"scale": f32(tensors["pre_layrnorm.weight"]),
                          "bias": f32(tensors["pre_layrnorm.bias"])}
  n_run = cfg.n_layers_run
  if n_run > 0:
    params["layers"] = stack(range(n_run))
  if n_run < cfg.n_layers:
    params["unused_layers"] = stack(range(n_run, cfg.n_layers))
  return params


def to_hf_tensors(params: dict[str, Any], cfg: VisionConfig) -> dict[str, np.ndarray]:
  """The inverse of `to_nnx_params`: VisionEncoder parameters (a pure dict) -> HF tensors
  (names after `vision_model.`, float32, [out, in] weights)."""
  f32 = lambda a: np.asarray(a, np.float32)
  t: dict[str, np.ndarray] = {
      "embeddings.patch_embedding.weight": f32(params["patch_embed"]["kernel"])
                                           .transpose(3, 2, 0, 1),  # HWIO -> [D, 3, P, P]
      "embeddings.position_embedding.weight": f32(params["pos_embed"]),
      "post_layernorm.weight": f32(params["post_norm"]["scale"]),
      "post_layernorm.bias": f32(params["post_norm"]["bias"]),
  }
  if cfg.patch_bias:
    t["embeddings.patch_embedding.bias"] = f32(params["patch_embed"]["bias"])
  if cfg.class_token:
    t["embeddings.class_embedding"] = f32(params["class_embed"])
  if cfg.pre_norm:
    t["pre_layrnorm.weight"] = f32(params["pre_norm"]["scale"])
    t["pre_layrnorm.bias"] = f32(params["pre_norm"]["bias"])
  stacks = [params[k] for k in ("layers", "unused_layers") if params.get(k)]
  i = 0
  for stack in stacks:
    n = np.shape(stack["norm1"]["scale"])[0]
    for j in range(n):
      layer = f"encoder.layers.{i}."
      linear = {"self_attn.q_proj": stack["attn"]["q"], "self_attn.k_proj": stack["attn"]["k"],
                "self_attn.v_proj": stack["attn"]["v"],
                "self_attn.out_proj": stack["attn"]["out"],
                "mlp.fc1": stack["mlp"]["fc1"], "mlp.fc2": stack["mlp"]["fc2"]}
      for hf, p in linear.items():
        t[f"{layer}{hf}.weight"] = np.ascontiguousarray(f32(p["kernel"][j]).T)
        t[f"{layer}{hf}.bias"] = f32(p["bias"][j])
      for hf, p in (("layer_norm1", stack["norm1"]), ("layer_norm2", stack["norm2"])):
        t[f"{layer}{hf}.weight"] = f32(p["scale"][j])
        t[f"{layer}{hf}.bias"] = f32(p["bias"][j])
      i += 1
  check_tensors(t, cfg, where="<exported vision tower>")  # fails only on a mapping bug
  return t


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
          for path, v in leaves}


def read_config(path: str, *, feature_layer: int = -2) -> VisionConfig:
  """The VisionConfig of an HF CLIP / SigLIP checkpoint directory (config.json, and
  preprocessor_config.json's mean/std when present)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no config.json (expected an HF CLIP or SigLIP "
                            "checkpoint directory)")
  mean = std = None
  processor_path = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(processor_path):
    processor = _read_json(processor_path)
    mean, std = processor.get("image_mean"), processor.get("image_std")
  try:
    cfg = vision_config_from_hf(_read_json(config_path),
                                name=os.path.basename(os.path.normpath(path)),
                                image_mean=mean, image_std=std)
  except CheckpointError as e:
    raise CheckpointError(f"{config_path}: {e}") from None
  return dataclasses.replace(cfg, feature_layer=feature_layer)


def architecture_problems(want: VisionConfig, got: VisionConfig) -> list[str]:
  """'field: model X, checkpoint Y' for every architecture field that differs (the ones
  that change parameter shapes or the computation; feature_layer is the model's choice)."""
  canon = lambda a: _SAME_ACTIVATION.get(a, a)
  problems = []
  for field in ("image_size", "patch_size", "width", "n_layers", "n_heads", "mlp_dim",
                "activation", "class_token", "pre_norm", "patch_bias", "norm_eps",
                "image_mean", "image_std"):
    a, b = getattr(want, field), getattr(got, field)
    if field == "activation":
      same = canon(a) == canon(b)
    elif isinstance(a, tuple):
      same = np.allclose(a, b, rtol=1e-6, atol=0)
    elif isinstance(a, float):
      same = math.isclose(a, b, rel_tol=1e-9)
    else:
      same = a == b
    if not same:
      problems.append(f"{field}: the model has {a!r}, the checkpoint {b!r}")
  return problems


def vision_params(path: str, cfg: VisionConfig) -> dict[str, Any]:
  """The parameters (pure dict, float32 numpy) of checkpoint `path` for an encoder of
  config `cfg`: the checkpoint's architecture must be `cfg`'s and its tensors must fit;
  CheckpointError names the directory and every field and tensor that does not."""
  got = read_config(path, feature_layer=cfg.feature_layer)
  tensors = read_vision_tensors(path)
  problems = architecture_problems(cfg, got) + tensor_problems(tensors, cfg)
  if problems:
    kind = hf_kind(_read_json(os.path.join(path, "config.json")))
    raise CheckpointError(f"{path}: the {kind.upper() if kind == 'clip' else 'SigLIP'} "
                          f"checkpoint does not fit vision encoder {cfg.name!r}:\n  "
                          + "\n  ".join(problems))
  return to_nnx_params(tensors, cfg)


def _params_for(encoder_config: VisionConfig, path: str) -> dict[str, Any]:
  """The checked, converted parameters of checkpoint `path` for an encoder of this config."""
  tensors = read_vision_tensors(path)
  check_tensors(tensors, encoder_config, where=path)
  return to_nnx_params(tensors, encoder_config)


def _assign(encoder: VisionEncoder, params: dict[str, Any]) -> None:
  state = nnx.state(encoder)
  want, got = _flat_shapes(nnx.to_pure_dict(state)), _flat_shapes(params)
  if want != got:  # a mapping bug, not a checkpoint problem
    raise AssertionError(f"converted parameters do not match the model: model {want}, "
                         f"converted {got}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(encoder, state)


def load_vision(path: str, *, dtype: Any = jnp.float32,
                feature_layer: int = -2) -> VisionEncoder:
  """A VisionEncoder built from the config of the HF CLIP or SigLIP checkpoint directory
  `path`, with its weights.

  dtype: compute dtype of the encoder's matrix products (parameters are float32).
  feature_layer: which hidden state the encoder returns (-2: penultimate layer's output).
  """
  cfg = read_config(path, feature_layer=feature_layer)
  params = _params_for(cfg, path)
  # Built abstractly (no random initialisation), then filled.
  encoder = nnx.eval_shape(lambda: VisionEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  _assign(encoder, params)
  return encoder


# The CLIP-era names; SigLIP directories load through them too.
load_clip_vision = load_vision


def load_vision_into(encoder: VisionEncoder, path: str) -> None:
  """Overwrites the parameters of an existing encoder (e.g. `VideoMa2mba.vision`, built
  from a preset) with the CLIP / SigLIP checkpoint at `path`; the checkpoint's architecture
  must be the encoder's (errors name each field and tensor that differs). The encoder's own
  feature layer and dtype are kept."""
  _assign(encoder, vision_params(path, encoder.config))


load_clip_vision_into = load_vision_into
