"""HF CLIP checkpoints (built here from random arrays) -> VisionEncoder, against a float64
numpy ViT written directly from the raw HF tensors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ma2mba_jax.convert.clip import CheckpointError, load_clip_vision
from ma2mba_jax.models.vision import CLIP_MEAN, CLIP_STD

# A small CLIP vision config, deliberately unlike the `tiny` preset (width 24, 3 heads,
# 6-pixel patches on 24-pixel images: a 4 x 4 grid).
HF_VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                 num_attention_heads=3, image_size=24, patch_size=6, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, num_channels=3)


def random_encoder_layer_tensors(hf: dict, w, gain) -> dict[str, np.ndarray]:
  """The encoder layers' tensors, shared by CLIP and SigLIP (names after `vision_model.`);
  `w(*shape)` and `gain(n)` draw the random weights and norm gains, in this order."""
  d, m = hf["hidden_size"], hf["intermediate_size"]
  t = {}
  for i in range(hf["num_hidden_layers"]):
    l = f"encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      t[f"{l}self_attn.{proj}.weight"] = w(d, d)
      t[f"{l}self_attn.{proj}.bias"] = w(d)
    for norm in ("layer_norm1", "layer_norm2"):
      t[f"{l}{norm}.weight"] = gain(d)
      t[f"{l}{norm}.bias"] = w(d)
    t[f"{l}mlp.fc1.weight"], t[f"{l}mlp.fc1.bias"] = w(m, d), w(m)
    t[f"{l}mlp.fc2.weight"], t[f"{l}mlp.fc2.bias"] = w(d, m), w(d)
  return t


def random_clip_tensors(hf: dict, seed: int) -> dict[str, np.ndarray]:
  """CLIPVisionModel tensors (names after `vision_model.`) with random float32 values."""
  rng = np.random.default_rng(seed)
  d, p = hf["hidden_size"], hf["patch_size"]
  n_pos = (hf["image_size"] // p) ** 2 + 1
  w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)
  gain = lambda n: (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)
  t = {
      "embeddings.patch_embedding.weight": w(d, 3, p, p),
      "embeddings.class_embedding": w(d),
      "embeddings.position_embedding.weight": w(n_pos, d),
      "pre_layrnorm.weight": gain(d), "pre_layrnorm.bias": w(d),
      "post_layernorm.weight": gain(d), "post_layernorm.bias": w(d),
  }
  t.update(random_encoder_layer_tensors(hf, w, gain))
  return t


def write_checkpoint(path, tensors: dict, hf: dict, *, layout: str = "vision",
                     tensor_dtype=np.float32, prefix: str = "", processor: dict | None = None):
  """Writes config.json + model.safetensors in the CLIPVisionModel ('vision'), CLIPModel
  ('clip', with text tensors and `vision_config`) or sharded CLIPVisionModel ('sharded')
  layout."""
  os.makedirs(path, exist_ok=True)
  out = {f"{prefix}vision_model.{k}": v.astype(tensor_dtype) for k, v in tensors.items()}
  if layout == "clip":
    rng = np.random.default_rng(1)
    out["text_model.embeddings.token_embedding.weight"] = rng.standard_normal((50, 16)).astype(
        np.float32)
    out["text_model.final_layer_norm.weight"] = np.ones(16, np.float32)
    out["visual_projection.weight"] = rng.standard_normal((8, hf["hidden_size"])).astype(
        np.float32)
    out["text_projection.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
    out["logit_scale"] = np.array(2.6592, np.float32)
    config = {"model_type": "clip", "projection_dim": 8,
              "text_config": {"hidden_size": 16, "num_hidden_layers": 1},
              "vision_config": hf}
  else:
    config = {"model_type": "clip_vision_model", **hf}
  if layout == "sharded":  # two shards and an index, as large checkpoints are saved
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
      save_file({k: out[k] for k in keys}, os.path.join(path, file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f)
  else:
    save_file(out, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  if processor is not None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump(processor, f)


# ------------------------------------------------------------------ the float64 oracle


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _act(x, name):
  if name == "quick_gelu":
    return x / (1.0 + np.exp(-1.702 * x))
  if name == "gelu":
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))
  raise ValueError(name)


def numpy_clip_features(tensors, hf, pixels01, mean, std, n_layers_run):
  """float64 CLIP vision forward, straight from the HF tensors: pixels in [0, 1]
  [B, S, S, 3] -> hidden state after `n_layers_run` layers without the class token."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  d, p, h, eps = hf["hidden_size"], hf["patch_size"], hf["num_attention_heads"], \
      hf["layer_norm_eps"]
  x = (np.asarray(pixels01, np.float64) - np.array(mean)) / np.array(std)  # [B, S, S, 3]
  b, s = x.shape[:2]
  g = s // p
  conv = t["embeddings.patch_embedding.weight"]  # [D, 3, P, P] (out, in, kh, kw)
  patches = np.zeros((b, g * g, d))
  for i in range(g):
    for j in range(g):
      window = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # [B, P(kh), P(kw), 3]
      patches[:, i * g + j] = np.einsum("byxc,dcyx->bd", window, conv)
  cls = np.broadcast_to(t["embeddings.class_embedding"], (b, 1, d))
  hs = np.concatenate([cls, patches], 1) + t["embeddings.position_embedding.weight"]
  hs = _layer_norm(hs, t["pre_layrnorm.weight"], t["pre_layrnorm.bias"], eps)
  e = d // h
  for i in range(n_layers_run):
    l = f"encoder.layers.{i}."
    lin = lambda z, name: z @ t[l + name + ".weight"].T + t[l + name + ".bias"]
    y = _layer_norm(hs, t[l + "layer_norm1.weight"], t[l + "layer_norm1.bias"], eps)
    q, k, v = (lin(y, f"self_attn.{n}_proj").reshape(b, -1, h, e) for n in "qkv")
    scores = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(e)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = scores / scores.sum(-1, keepdims=True)
    y = np.einsum("bhts,bshe->bthe", attn, v).reshape(b, -1, d)
    hs = hs + lin(y, "self_attn.out_proj")
    y = _layer_norm(hs, t[l + "layer_norm2.weight"], t[l + "layer_norm2.bias"], eps)
    hs = hs + lin(_act(lin(y, "mlp.fc1"), hf["hidden_act"]), "mlp.fc2")
  return hs[:, 1:]


# ------------------------------------------------------------------------------ tests


def _images(seed, n=2, side=24):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout,act,tensor_dtype,prefix", [
    ("vision", "quick_gelu", np.float32, ""),
    ("clip", "quick_gelu", np.float32, ""),
    ("vision", "gelu", np.float16, ""),
    ("vision", "quick_gelu", ml_dtypes.bfloat16, "model.vision_tower."),
    ("sharded", "quick_gelu", np.float32, ""),
])
def test_converted_features_match_numpy(tmp_path, layout, act, tensor_dtype, prefix):
  hf = dict(HF_VISION, hidden_act=act)
  tensors = random_clip_tensors(hf, seed=3)
  write_checkpoint(tmp_path / "ckpt", tensors, hf, layout=layout, tensor_dtype=tensor_dtype,
                   prefix=prefix)
  encoder = load_clip_vision(str(tmp_path / "ckpt"))
  assert encoder.config.n_layers == 3 and encoder.config.width == 24

  images = _images(0)
  got = np.asarray(encoder(images))
  # The oracle sees the tensors as stored (after the checkpoint's dtype rounding).
  stored = {k: v.astype(tensor_dtype).astype(np.float64) for k, v in tensors.items()}
  want = numpy_clip_features(stored, hf, images / 255.0, CLIP_MEAN, CLIP_STD, n_layers_run=2)
  assert got.shape == want.shape == (2, 16, 24)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  # The last layer matters: running it changes the result (so "penultimate" is meaningful).
  last = numpy_clip_features(stored, hf, images / 255.0, CLIP_MEAN, CLIP_STD, n_layers_run=3)
  assert np.abs(last - want).max() > 0.1 * np.abs(want).max()


def test_float_frames_and_processor_stats(tmp_path):
  """Float frames in [0, 1] equal their uint8 versions; preprocessor mean/std are used."""
  mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
  tensors = random_clip_tensors(HF_VISION, seed=5)
  write_checkpoint(tmp_path / "ckpt", tensors, HF_VISION,
                   processor={"image_mean": mean, "image_std": std})
  encoder = load_clip_vision(str(tmp_path / "ckpt"))
  images = _images(1)
  from_uint8 = np.asarray(encoder(images))
  from_float = np.asarray(encoder(jnp.asarray(images / 255.0, jnp.float32)))
  np.testing.assert_allclose(from_float, from_uint8, rtol=1e-5, atol=1e-5)
  want = numpy_clip_features(tensors, HF_VISION, images / 255.0, mean, std, n_layers_run=2)
  np.testing.assert_allclose(from_uint8, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_feature_layer_choice(tmp_path):
  tensors = random_clip_tensors(HF_VISION, seed=7)
  write_checkpoint(tmp_path / "ckpt", tensors, HF_VISION)
  encoder = load_clip_vision(str(tmp_path / "ckpt"), feature_layer=-1)
  images = _images(2, n=1)
  want = numpy_clip_features(tensors, HF_VISION, images / 255.0, CLIP_MEAN, CLIP_STD, 3)
  np.testing.assert_allclose(np.asarray(encoder(images)), want, rtol=2e-4,
                             atol=2e-4 * np.abs(want).max())


def test_mis_shaped_tensor_is_named(tmp_path):
  tensors = random_clip_tensors(HF_VISION, seed=0)
  tensors["encoder.layers.1.mlp.fc1.weight"] = np.zeros((41, 24), np.float32)
  write_checkpoint(tmp_path / "ckpt", tensors, HF_VISION)
  with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc1\.weight: "
                     r"expected shape \[40, 24\], got \[41, 24\]"):
    load_clip_vision(str(tmp_path / "ckpt"))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  tensors = random_clip_tensors(HF_VISION, seed=0)
  del tensors["pre_layrnorm.bias"]
  tensors["encoder.layers.3.mlp.fc2.bias"] = np.zeros(24, np.float32)  # a 4th layer
  write_checkpoint(tmp_path / "ckpt", tensors, HF_VISION)
  with pytest.raises(CheckpointError) as err:
    load_clip_vision(str(tmp_path / "ckpt"))
  assert "missing vision_model.pre_layrnorm.bias (expected shape [24])" in str(err.value)
  assert "unexpected vision_model.encoder.layers.3.mlp.fc2.bias" in str(err.value)


def test_not_a_clip_checkpoint(tmp_path):
  os.makedirs(tmp_path / "ckpt")
  save_file({"backbone.embeddings.weight": np.zeros((4, 4), np.float32)},
            str(tmp_path / "ckpt" / "model.safetensors"))
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump(HF_VISION, f)
  with pytest.raises(CheckpointError, match="patch_embedding"):
    load_clip_vision(str(tmp_path / "ckpt"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_clip_vision(str(tmp_path / "nowhere"))
  # SigLIP loads (tests/convert/test_pretrained_vision.py); SigLIP 2 is refused by name.
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump({"model_type": "siglip2_vision_model", **HF_VISION}, f)
  with pytest.raises(CheckpointError, match="SigLIP 2"):
    load_clip_vision(str(tmp_path / "ckpt"))
