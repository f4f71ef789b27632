"""Load a CLIP vision tower from a local Hugging Face checkpoint into `VisionEncoder`.

A checkpoint directory holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), with the tensor names of transformers' `CLIPVisionModel`
(`vision_model.*`) or `CLIPModel` (the same `vision_model.*` plus `text_model.*` and
projections, which are ignored; its config keeps the vision fields under `vision_config`).
Names with a prefix before `vision_model.` (a tower saved inside a larger model) load too.
`preprocessor_config.json`, when present, supplies the image mean/std.

Name and layout mapping (HF weight [out, in] -> NNX kernel [in, out]):
  embeddings.patch_embedding.weight [D, 3, P, P]   -> patch_embed/kernel [P, P, 3, D]
  embeddings.class_embedding [D]                    -> class_embed [D]
  embeddings.position_embedding.weight [T, D]       -> pos_embed [T, D]
  pre_layrnorm.{weight,bias}                        -> pre_norm/{scale,bias}
  encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*   -> layers/attn/{q,k,v,out}/* [i]
  encoder.layers.{i}.layer_norm{1,2}.*              -> layers/norm{1,2}/* [i]
  encoder.layers.{i}.mlp.fc{1,2}.*                  -> layers/mlp/fc{1,2}/* [i]
    (layers i >= n_layers_run, never run for features, go to unused_layers/* [i - n_run])
  post_layernorm.{weight,bias}                      -> post_norm/{scale,bias}
Parameters are stored in float32 whatever the checkpoint's dtype.

Axis legend: D width, P patch side, T positions, M MLP width, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from ma2mba_jax.models.vision import ACTIVATIONS, CLIP_MEAN, CLIP_STD, VisionConfig, VisionEncoder

_ANCHOR = "vision_model.embeddings.patch_embedding.weight"
# Buffers some transformers versions save; not parameters.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)

# transformers' CLIPVisionConfig defaults, for fields a config.json leaves out.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=32,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it is loaded into."""


def vision_config_from_hf(hf_config: dict[str, Any], *, name: str = "hf-clip",
                          image_mean=CLIP_MEAN, image_std=CLIP_STD) -> VisionConfig:
  """A VisionConfig from a CLIPVisionConfig dict, or a CLIPConfig dict (its `vision_config`)."""
  model_type = str(hf_config.get("model_type", ""))
  if "siglip" in model_type:
    raise CheckpointError(f"model_type {model_type!r}: only CLIP checkpoints are converted "
                          "(the siglip-so400m-384 preset builds the architecture only)")
  hf = dict(_HF_DEFAULTS)
  hf.update(hf_config.get("vision_config") or hf_config)
  act = hf["hidden_act"]
  if act not in ACTIVATIONS:
    raise CheckpointError(f"unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
  return VisionConfig(name=name, image_size=int(hf["image_size"]),
                      patch_size=int(hf["patch_size"]), width=int(hf["hidden_size"]),
                      n_layers=int(hf["num_hidden_layers"]),
                      n_heads=int(hf["num_attention_heads"]),
                      mlp_dim=int(hf["intermediate_size"]), activation=act, class_token=True,
                      pre_norm=True, patch_bias=False, norm_eps=float(hf["layer_norm_eps"]),
                      image_mean=tuple(image_mean), image_std=tuple(image_std))


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


def read_vision_tensors(ckpt_dir: str) -> dict[str, np.ndarray]:
  """The vision tensors of a checkpoint, keyed by their name after `vision_model.`."""
  files = _tensor_files(ckpt_dir)
  names: dict[str, list[str]] = {}
  for file in files:
    with safe_open(file, framework="np") as f:
      names[file] = list(f.keys())
  anchors = [n for keys in names.values() for n in keys if n.endswith(_ANCHOR)]
  if not anchors:
    raise CheckpointError(f"{ckpt_dir}: no tensor named '...{_ANCHOR}'; is this a CLIP "
                          "vision checkpoint?")
  prefix = anchors[0][: -len(_ANCHOR)] + "vision_model."
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
      "embeddings.class_embedding": (d,),
      "embeddings.position_embedding.weight": (cfg.n_positions, d),
      "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
      "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
  }
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


def check_tensors(tensors: dict[str, np.ndarray], cfg: VisionConfig, where: str = "") -> None:
  """Raises CheckpointError naming every missing, unexpected or mis-shaped vision tensor."""
  expected = _expected_shapes(cfg)
  problems = []
  for name, shape in expected.items():
    if name not in tensors:
      problems.append(f"missing vision_model.{name} (expected shape {list(shape)})")
    elif tuple(tensors[name].shape) != shape:
      problems.append(f"vision_model.{name}: expected shape {list(shape)}, got "
                      f"{list(tensors[name].shape)}")
  for name in sorted(set(tensors) - set(expected)):
    if not name.endswith(_IGNORED_SUFFIXES):
      problems.append(f"unexpected vision_model.{name} {list(tensors[name].shape)} (the "
                      f"config says {cfg.n_layers} layers of width {cfg.width})")
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
      "class_embed": f32(tensors["embeddings.class_embedding"]),
      "pos_embed": f32(tensors["embeddings.position_embedding.weight"]),
      "pre_norm": {"scale": f32(tensors["pre_layrnorm.weight"]),
                   "bias": f32(tensors["pre_layrnorm.bias"])},
      "post_norm": {"scale": f32(tensors["post_layernorm.weight"]),
                    "bias": f32(tensors["post_layernorm.bias"])},
  }
  n_run = cfg.n_layers_run
  if n_run > 0:
    params["layers"] = stack(range(n_run))
  if n_run < cfg.n_layers:
    params["unused_layers"] = stack(range(n_run, cfg.n_layers))
  return params


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
          for path, v in leaves}


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


def load_clip_vision(path: str, *, dtype: Any = jnp.float32,
                     feature_layer: int = -2) -> VisionEncoder:
  """A VisionEncoder built from the config of the HF CLIP checkpoint directory `path`, with
  its weights.

  dtype: compute dtype of the encoder's matrix products (parameters are float32).
  feature_layer: which hidden state the encoder returns (-2: penultimate layer's output).
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no config.json (expected an HF CLIP checkpoint directory)")
  mean, std = CLIP_MEAN, CLIP_STD
  processor_path = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(processor_path):
    processor = _read_json(processor_path)
    mean = processor.get("image_mean", mean)
    std = processor.get("image_std", std)
  cfg = vision_config_from_hf(_read_json(config_path), name=os.path.basename(path.rstrip("/")),
                              image_mean=mean, image_std=std)
  cfg = dataclasses.replace(cfg, feature_layer=feature_layer)
  params = _params_for(cfg, path)
  # Built abstractly (no random initialisation), then filled.
  encoder = nnx.eval_shape(lambda: VisionEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  _assign(encoder, params)
  return encoder


def load_clip_vision_into(encoder: VisionEncoder, path: str) -> None:
  """Overwrites the parameters of an existing encoder (e.g. `VideoMa2mba.vision`, built
  from a preset) with the CLIP checkpoint at `path`; the checkpoint's tensors must have the
  shapes the encoder's config implies (errors name each offending tensor). The encoder's own
  config (feature layer, mean/std, dtype) is kept."""
  _assign(encoder, _params_for(encoder.config, path))
