"""Vision checkpoints in both HF tensor layouts (with and without the `vision_model.`
prefix) and SigLIP's: small random checkpoints written here load into VisionEncoder and give
the features of an independent float64 numpy forward; the inverse mapping (for --export-hf)
gives back the same tensors; an encoder built from a preset refuses a checkpoint of another
architecture, naming the directory, the fields and the tensors. With torch and transformers
installed, the features also equal transformers' CLIPVisionModel / SiglipVisionModel."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert.clip import CheckpointError, load_vision
from ma2mba_jax.models.vision import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD,
                                      VisionEncoder, vision_config)
from tests.convert.test_clip_convert import (HF_VISION, _layer_norm, numpy_clip_features,
                                             random_encoder_layer_tensors,
                                             random_clip_tensors, write_checkpoint)

# A small SigLIP vision config (width 24, 3 heads, 6-pixel patches on 26-pixel images: a
# 4 x 4 grid that leaves 2 pixels uncovered, as so400m's 27 x 14 = 378 of 384 does).
HF_SIGLIP = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                 num_attention_heads=3, image_size=26, patch_size=6,
                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3)


def random_siglip_tensors(hf: dict, seed: int, *, head: bool = True) -> dict[str, np.ndarray]:
  """SiglipVisionModel tensors (names after `vision_model.`), random float32, with the
  attention-pooling head's tensors when `head`."""
  rng = np.random.default_rng(seed)
  d, m, p = hf["hidden_size"], hf["intermediate_size"], hf["patch_size"]
  n_pos = (hf["image_size"] // p) ** 2
  w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)
  gain = lambda n: (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)
  t = {
      "embeddings.patch_embedding.weight": w(d, 3, p, p),
      "embeddings.patch_embedding.bias": w(d),
      "embeddings.position_embedding.weight": w(n_pos, d),
      "post_layernorm.weight": gain(d), "post_layernorm.bias": w(d),
  }
  t.update(random_encoder_layer_tensors(hf, w, gain))
  if head:
    t.update({"head.probe": w(1, 1, d), "head.attention.in_proj_weight": w(3 * d, d),
              "head.attention.in_proj_bias": w(3 * d),
              "head.attention.out_proj.weight": w(d, d), "head.attention.out_proj.bias": w(d),
              "head.layernorm.weight": gain(d), "head.layernorm.bias": w(d),
              "head.mlp.fc1.weight": w(m, d), "head.mlp.fc1.bias": w(m),
              "head.mlp.fc2.weight": w(d, m), "head.mlp.fc2.bias": w(d)})
  return t


def write_siglip(path, tensors, hf, *, prefix="vision_model.", full_model=False):
  """config.json + model.safetensors as SiglipVisionModel (or SiglipModel, with a text
  tower and the vision fields under `vision_config`)."""
  os.makedirs(path, exist_ok=True)
  out = {f"{prefix}{k}": v for k, v in tensors.items()}
  if full_model:
    out["text_model.embeddings.token_embedding.weight"] = np.ones((10, 8), np.float32)
    out["logit_scale"] = np.ones(1, np.float32)
    config = {"model_type": "siglip", "text_config": {"hidden_size": 8},
              "vision_config": hf}
  else:
    config = {"model_type": "siglip_vision_model", **hf}
  save_file(out, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_siglip_features(tensors, hf, pixels01, n_layers_run):
  """float64 SigLIP vision forward from the HF tensors: pixels [B, S, S, 3] in [0, 1] ->
  hidden state after `n_layers_run` layers (no class token, no pre-norm)."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  d, p, h, eps = (hf["hidden_size"], hf["patch_size"], hf["num_attention_heads"],
                  hf["layer_norm_eps"])
  x = (np.asarray(pixels01, np.float64) - np.array(SIGLIP_MEAN)) / np.array(SIGLIP_STD)
  b, s = x.shape[:2]
  g = s // p
  conv = t["embeddings.patch_embedding.weight"]
  hs = np.zeros((b, g * g, d))
  for i in range(g):
    for j in range(g):
      window = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]
      hs[:, i * g + j] = np.einsum("byxc,dcyx->bd", window, conv)
  hs = hs + t["embeddings.patch_embedding.bias"] + t["embeddings.position_embedding.weight"]
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
    hs = hs + lin(_gelu_tanh(lin(y, "mlp.fc1")), "mlp.fc2")
  return hs


def _images(seed, side, n=2):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_clip_without_the_vision_model_prefix(tmp_path):
  """transformers 5's CLIPVisionModel.save_pretrained writes `embeddings.*`, `encoder.*`."""
  tensors = random_clip_tensors(HF_VISION, seed=21)
  os.makedirs(tmp_path / "ckpt")
  save_file(dict(tensors), str(tmp_path / "ckpt" / "model.safetensors"))
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump({"model_type": "clip_vision_model", **HF_VISION}, f)
  encoder = load_vision(str(tmp_path / "ckpt"))
  images = _images(0, 24)
  want = numpy_clip_features(tensors, HF_VISION, images / 255.0, CLIP_MEAN, CLIP_STD, 2)
  _close(np.asarray(encoder(images)), want)


@pytest.mark.parametrize("full_model,prefix", [(False, "vision_model."), (True, "vision_model."),
                                               (False, "")])
def test_siglip_features_match_numpy(tmp_path, full_model, prefix):
  tensors = random_siglip_tensors(HF_SIGLIP, seed=4)
  write_siglip(tmp_path / "ckpt", tensors, HF_SIGLIP, prefix=prefix, full_model=full_model)
  encoder = load_vision(str(tmp_path / "ckpt"))
  cfg = encoder.config
  assert (cfg.class_token, cfg.pre_norm, cfg.patch_bias) == (False, False, True)
  assert cfg.image_mean == SIGLIP_MEAN and cfg.norm_eps == 1e-6
  images = _images(1, 26)
  want = numpy_siglip_features(tensors, HF_SIGLIP, images / 255.0, n_layers_run=2)
  got = np.asarray(encoder(images))
  assert got.shape == want.shape == (2, 16, 24)
  _close(got, want)
  # Without the patch bias (or with the wrong position count) the result would differ.
  no_bias = dict(tensors, **{"embeddings.patch_embedding.bias": np.zeros(24, np.float32)})
  assert np.abs(numpy_siglip_features(no_bias, HF_SIGLIP, images / 255.0, 2) - want).max() \
      > 0.05 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_tensors_round_trip(kind):
  """to_hf_tensors inverts to_nnx_params exactly (layers split into run / unused)."""
  hf = HF_VISION if kind == "clip" else HF_SIGLIP
  tensors = (random_clip_tensors(hf, seed=5) if kind == "clip"
             else random_siglip_tensors(hf, seed=5, head=False))
  cfg = vision_ckpt.vision_config_from_hf({"model_type": f"{kind}_vision_model", **hf})
  params = vision_ckpt.to_nnx_params(tensors, cfg)
  assert "unused_layers" in params  # feature_layer -2: the last layer is kept, not run
  back = vision_ckpt.to_hf_tensors(params, cfg)
  assert sorted(back) == sorted(tensors)
  for name in tensors:
    np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
  hf_config = vision_ckpt.hf_config_from_vision(cfg)
  assert vision_ckpt.vision_config_from_hf(hf_config, name=cfg.name) == cfg


def test_so400m_preset_is_the_published_siglip_layout():
  cfg = vision_config("siglip-so400m-384")
  hf = vision_ckpt.hf_config_from_vision(cfg)
  assert hf["model_type"] == "siglip_vision_model"
  assert (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
          hf["num_attention_heads"], hf["image_size"], hf["patch_size"],
          hf["hidden_act"]) == (1152, 4304, 27, 16, 384, 14, "gelu_pytorch_tanh")
  shapes = vision_ckpt._expected_shapes(cfg)
  assert shapes["embeddings.position_embedding.weight"] == (729, 1152)
  assert shapes["embeddings.patch_embedding.bias"] == (1152,)
  assert "embeddings.class_embedding" not in shapes and "pre_layrnorm.weight" not in shapes
  # so400m's vision tower without its pooling head: 27 layers of this size.
  per_layer = 4 * (1152 * 1152 + 1152) + 4 * 1152 + 2 * 1152 * 4304 + 4304 + 1152
  embed = 1152 * 3 * 14 * 14 + 1152 + 729 * 1152
  assert sum(int(np.prod(s)) for s in shapes.values()) == embed + 27 * per_layer + 2 * 1152


def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
  """The preset's encoder (tiny CLIP) vs a SigLIP and a narrower CLIP checkpoint."""
  encoder = nnx.eval_shape(lambda: VisionEncoder(vision_config("tiny"), rngs=nnx.Rngs(0)))
  cfg = encoder.config
  write_siglip(tmp_path / "siglip", random_siglip_tensors(HF_SIGLIP, seed=0), HF_SIGLIP)
  with pytest.raises(CheckpointError) as err:
    vision_ckpt.vision_params(str(tmp_path / "siglip"), cfg)
  message = str(err.value)
  assert str(tmp_path / "siglip") in message and "SigLIP checkpoint" in message
  for needed in ("class_token: the model has True, the checkpoint False",
                 "width: the model has 32, the checkpoint 24",
                 "missing vision_model.embeddings.class_embedding"):
    assert needed in message, message
  # Same layout, one tensor of a wrong dtype: named with its dtype.
  hf = dict(HF_VISION, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            image_size=32, patch_size=8)
  tensors = random_clip_tensors(hf, seed=1)
  write_checkpoint(tmp_path / "clip", tensors, hf)
  save_file({**{f"vision_model.{k}": v for k, v in tensors.items()},
             "vision_model.encoder.layers.0.mlp.fc1.bias": np.zeros(64, np.int32)},
            str(tmp_path / "clip" / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.bias: "
                     r"dtype int32"):
    vision_ckpt.vision_params(str(tmp_path / "clip"), cfg)


# ------------------------------------------------------------------ transformers parity


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_features_match_transformers(tmp_path, kind):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if kind == "clip":
    hf, tensors = HF_VISION, random_clip_tensors(HF_VISION, seed=9)
    write_checkpoint(tmp_path / "ckpt", tensors, HF_VISION)
    ref = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "ckpt"))
  else:
    hf, tensors = HF_SIGLIP, random_siglip_tensors(HF_SIGLIP, seed=9)
    write_siglip(tmp_path / "ckpt", tensors, HF_SIGLIP)
    ref = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "ckpt"))
  ref = ref.float().eval()
  encoder = load_vision(str(tmp_path / "ckpt"))
  images = _images(3, hf["image_size"])
  mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
  pixels = (images / 255.0 - np.array(mean)) / np.array(std)
  with torch.no_grad():
    out = ref(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32),
              output_hidden_states=True)
  want = out.hidden_states[-2].numpy()[:, 1 if kind == "clip" else 0:]
  _close(np.asarray(encoder(images)), want)
