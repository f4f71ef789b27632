"""The ViT: preset sizes (abstractly), layer scan and remat, feature-layer choice, dtypes.

Numerical agreement with an independent float64 CLIP forward is in
tests/convert/test_clip_convert.py (it needs HF-named weights)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.models.vision import VisionEncoder, quick_gelu, vision_config


def n_params(module) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def vit_param_formula(image, patch, width, layers, mlp, class_token, pre_norm, patch_bias):
  """Parameter count of a CLIP/SigLIP-layout ViT, written out by hand."""
  grid = image // patch
  embed = width * 3 * patch * patch + patch_bias * width
  embed += (grid * grid + class_token) * width + class_token * width
  layer = 4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp) + (mlp * width + width)
  return embed + pre_norm * 2 * width + layers * layer + 2 * width  # + post-norm


def test_clip_l_336_parameter_count_and_feature_shape():
  cfg = vision_config("clip-l-336")
  model = nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))
  # openai/clip-vit-large-patch14-336's vision tower (CLIPVisionModel) has 303,507,456.
  assert n_params(model) == 303_507_456
  assert n_params(model) == vit_param_formula(336, 14, 1024, 24, 4096, True, True, False)
  assert (cfg.grid, cfg.n_patches, cfg.n_positions, cfg.n_layers_run) == (24, 576, 577, 23)
  images = jax.ShapeDtypeStruct((2, 336, 336, 3), jnp.uint8)
  out = nnx.eval_shape(lambda m, x: m(x), model, images)
  assert out.shape == (2, 576, 1024) and out.dtype == jnp.float32


def test_siglip_so400m_384_parameter_count_and_feature_shape():
  cfg = vision_config("siglip-so400m-384")
  model = nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))
  # 27 x 27 patches (the last 6 pixel rows/columns are outside every patch), no class token.
  assert (cfg.grid, cfg.n_positions) == (27, 729)
  assert n_params(model) == vit_param_formula(384, 14, 1152, 27, 4304, False, False, True)
  out = nnx.eval_shape(lambda m, x: m(x), model,
                       jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.uint8))
  assert out.shape == (1, 729, 1152)


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError, match=r"clip-l-336.*siglip-so400m-384.*tiny"):
    vision_config("clip-h")


def test_bad_config_values_are_rejected():
  with pytest.raises(ValueError, match="n_heads"):
    vision_config("tiny", n_heads=5)
  with pytest.raises(ValueError, match="activation"):
    vision_config("tiny", activation="swish")
  with pytest.raises(ValueError, match="feature_layer"):
    vision_config("tiny", feature_layer=-5)


def test_wrong_image_size_is_rejected():
  model = VisionEncoder(vision_config("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expects images \[\.\.\., 32, 32, 3\]"):
    model(jnp.zeros((1, 16, 16, 3), jnp.uint8))


def _images(seed, n=3, side=32):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)), jnp.uint8)


def _unrolled(model: VisionEncoder, images, n_layers):
  """The same network with a Python loop over explicitly sliced layer parameters."""
  x = model.embed(images)
  if n_layers == 0:
    return x[:, 1:]
  p = nnx.state(model.layers, nnx.Param)
  cfg = model.config
  ln = lambda z, s, b: (z - z.mean(-1, keepdims=True)) / jnp.sqrt(
      z.var(-1, keepdims=True) + cfg.norm_eps) * s + b
  for i in range(n_layers):
    g = jax.tree.map(lambda a: a[i], p)
    lin = lambda z, mod: z @ mod["kernel"][...] + mod["bias"][...]
    y = ln(x, g["norm1"]["scale"][...], g["norm1"]["bias"][...])
    b, t, d = y.shape
    heads = lambda z: z.reshape(b, t, cfg.n_heads, -1)
    q, k, v = (heads(lin(y, g["attn"][n])) for n in "qkv")
    w = jax.nn.softmax(jnp.einsum("bthe,bshe->bhts", q, k) / np.sqrt(d // cfg.n_heads), -1)
    x = x + lin(jnp.einsum("bhts,bshe->bthe", w, v).reshape(b, t, d), g["attn"]["out"])
    y = ln(x, g["norm2"]["scale"][...], g["norm2"]["bias"][...])
    x = x + lin(quick_gelu(lin(y, g["mlp"]["fc1"])), g["mlp"]["fc2"])
  return x[:, 1:]


def _max_rel(a, b) -> float:
  """Largest |a - b| over the largest |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def scan_error(feature_layer: int, seed: int) -> float:
  """The scanned encoder against the unrolled loop, model and images drawn with `seed`."""
  model = VisionEncoder(vision_config("tiny", feature_layer=feature_layer),
                        rngs=nnx.Rngs(1 + seed))
  images = _images(seed)
  return _max_rel(model(images), _unrolled(model, images, model.config.n_layers_run))


def remat_errors(seed: int) -> tuple[dict[str, float], nnx.State]:
  """Features and gradients with and without remat. Some gradients are zero in exact
  arithmetic (the key bias: softmax ignores a shift shared by all keys), so gradient
  errors are relative to the largest gradient."""
  model = VisionEncoder(vision_config("tiny"), rngs=nnx.Rngs(2 + seed))
  images = _images(1 + seed, n=3)
  cot = jax.random.normal(jax.random.key(seed), (3, 16, 32))

  def loss(m, remat):
    return jnp.sum(m(images, remat=remat) * cot)

  plain = nnx.jit(nnx.grad(lambda m: loss(m, False)))(model)
  remat = nnx.jit(nnx.grad(lambda m: loss(m, True)))(model)
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(plain))
  grads = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
              for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)))
  errors = {"features": _max_rel(model(images, remat=True), model(images)), "grads": grads}
  return errors, plain  # plain: the gradients without remat


# Sweep (python -m tests.models.model_tolerance_sweep, 20 seeds, f32 on CPU, 2026-11-26):
# scan vs unrolled 3.7e-7 at worst; remat features equal exactly, gradients 3.3e-7 (over the
# largest gradient); bf16 vs f32 4.4e-3 .. 8.7e-3. Tolerances: about 10x the worst seed
# (the exact one: another platform's rounding).
SCAN_TOL = 5e-6
REMAT_FEATURES_TOL = 1e-6
REMAT_GRADS_TOL = 5e-6


@pytest.mark.parametrize("feature_layer,n_run", [(-2, 2), (-1, 3), (1, 1), (0, 0)])
def test_scanned_layers_match_unrolled_loop(feature_layer, n_run):
  cfg = vision_config("tiny", feature_layer=feature_layer)
  assert cfg.n_layers_run == n_run
  model = VisionEncoder(cfg, rngs=nnx.Rngs(1))
  # The layers that run form one stack; the others are kept apart, same layout.
  stack_len = lambda m: 0 if m is None else m.attn.q.kernel.shape[0]
  assert (stack_len(model.layers), stack_len(model.unused_layers)) == (n_run, 3 - n_run)
  assert n_params(model) == vit_param_formula(32, 8, 32, 3, 64, True, True, False)
  assert model(_images(0)).shape == (3, 16, 32)
  assert scan_error(feature_layer, 0) < SCAN_TOL


def test_remat_gives_same_features_and_gradients():
  errors, plain = remat_errors(0)
  assert errors["features"] < REMAT_FEATURES_TOL and errors["grads"] < REMAT_GRADS_TOL, errors
  # Every layer run for the features gets a gradient; the unused last layer and post-norm
  # get exactly zero.
  fc1 = np.asarray(plain["layers"]["mlp"]["fc1"]["kernel"][...])  # [2, D, M]
  assert fc1.shape[0] == 2 and np.all(np.abs(fc1).sum(axis=(1, 2)) > 0)
  for x in jax.tree.leaves(plain["unused_layers"]) + jax.tree.leaves(plain["post_norm"]):
    assert np.all(np.asarray(x) == 0)
  assert np.abs(np.asarray(plain["patch_embed"]["kernel"][...])).sum() > 0


def test_remat_keeps_one_activation_per_layer():
  """Under remat the backward pass keeps, per image, each layer's input [T, D] and the
  embedding stage's few arrays; without it, attention weights and MLP activations too."""
  cfg = vision_config("tiny", feature_layer=-1)  # all 3 layers run
  graphdef, params = nnx.split(VisionEncoder(cfg, rngs=nnx.Rngs(3)))

  def residual_floats(remat, n_images):
    images = jax.ShapeDtypeStruct((n_images, 32, 32, 3), jnp.uint8)
    loss = lambda p, im: jnp.sum(nnx.merge(graphdef, p)(im, remat=remat) ** 2)
    # The VJP closure's leaves are the saved residuals; shapes only, nothing runs.
    vjp = jax.eval_shape(lambda p, im: jax.vjp(lambda q: loss(q, im), p)[1], params, images)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vjp))

  # Differences between batch sizes cancel the parameter-sized residuals.
  per_image_remat = residual_floats(True, 3) - residual_floats(True, 2)
  per_image_plain = residual_floats(False, 3) - residual_floats(False, 2)
  t, d, pixels = cfg.n_positions, cfg.width, 32 * 32 * 3
  # Layer inputs, plus (outside the scan) the normalised pixels, the pre-norm's input,
  # output and statistics, and the features: well under 5 more [T, D].
  assert per_image_remat <= cfg.n_layers * t * d + pixels + 5 * t * d, per_image_remat
  assert per_image_plain > 4 * per_image_remat, (per_image_plain, per_image_remat)


def bf16_error(seed: int) -> float:
  """bf16 compute against f32 compute, the same f32 parameters (same init seed)."""
  cfg = vision_config("tiny")
  f32_model = VisionEncoder(cfg, rngs=nnx.Rngs(4 + seed))
  bf16_model = VisionEncoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(4 + seed))
  for a, b in zip(jax.tree.leaves(nnx.state(f32_model)), jax.tree.leaves(nnx.state(bf16_model))):
    np.testing.assert_array_equal(a, b)
  images = _images(3 + seed)
  got = bf16_model(images)
  assert got.dtype == jnp.float32
  return _max_rel(got, f32_model(images))


BF16_MIN, BF16_TOL = 1e-3, 3e-2  # sweep above: 4.4e-3 .. 8.7e-3


def test_bfloat16_compute_is_close_to_float32():
  assert BF16_MIN < bf16_error(0) < BF16_TOL


def test_float_pixels_equal_uint8_pixels():
  model = VisionEncoder(vision_config("tiny"), rngs=nnx.Rngs(5))
  images = _images(4)
  np.testing.assert_allclose(model(images.astype(jnp.float32) / 255.0), model(images),
                             rtol=1e-5, atol=1e-5)
