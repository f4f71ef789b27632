"""Patch-grid pooling and the MLP projector against direct numpy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.models.projector import Projector, pool_patch_grid, pooled_side


def _features(seed, b, grid, d):
  return np.random.default_rng(seed).standard_normal((b, grid * grid, d)).astype(np.float32)


def numpy_bilinear(x, out_side):
  """[B, G, G, D] -> [B, R, R, D]: bilinear at half-pixel centres, edges clamped, no
  antialiasing (PyTorch's interpolate(mode='bilinear', align_corners=False)), in float64."""
  g = x.shape[1]

  def weights(n_in, n_out):  # [n_out, n_in] interpolation matrix
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      lo = min(int(math.floor(src)), n_in - 1)
      hi = min(lo + 1, n_in - 1)
      frac = src - lo
      w[i, lo] += 1 - frac
      w[i, hi] += frac
    return w

  w = weights(g, out_side)
  return np.einsum("ri,bijd,sj->brsd", w, np.asarray(x, np.float64), w)


def test_factor_two_pooling_is_2x2_average_on_the_clip_grid():
  x = _features(0, 2, 24, 8)
  got = np.asarray(pool_patch_grid(jnp.asarray(x), 2))
  assert got.shape == (2, 144, 8)
  want = x.reshape(2, 12, 2, 12, 2, 8).mean(axis=(2, 4)).reshape(2, 144, 8)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Token j of the output covers patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1).
  r, c = 5, 7
  patch = lambda i, j: x[:, i * 24 + j]
  np.testing.assert_allclose(
      got[:, r * 12 + c],
      (patch(2 * r, 2 * c) + patch(2 * r, 2 * c + 1) + patch(2 * r + 1, 2 * c)
       + patch(2 * r + 1, 2 * c + 1)) / 4, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid,factor,side", [(27, 2, 14), (6, 3, 2), (5, 2, 3), (8, 4, 2)])
def test_pooling_matches_direct_bilinear(grid, factor, side):
  assert pooled_side(grid, factor) == side
  x = _features(grid, 2, grid, 4)
  got = np.asarray(pool_patch_grid(jnp.asarray(x), factor))
  want = numpy_bilinear(x.reshape(2, grid, grid, 4), side).reshape(2, side * side, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pooling_edge_cases():
  x = jnp.asarray(_features(1, 1, 4, 3))
  np.testing.assert_array_equal(pool_patch_grid(x, 1), x)
  bf16 = pool_patch_grid(x.astype(jnp.bfloat16), 2)
  assert bf16.dtype == jnp.bfloat16 and bf16.shape == (1, 4, 3)
  with pytest.raises(ValueError, match="square"):
    pool_patch_grid(jnp.zeros((1, 12, 3)), 2)
  with pytest.raises(ValueError, match=">= 1"):
    pooled_side(24, 0)


@pytest.mark.parametrize("hidden", [None, 24])
def test_projector_matches_numpy(hidden):
  proj = Projector(16, 40, hidden_width=hidden, pool_factor=2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  for layer in (proj.fc1, proj.fc2):  # biases start at zero; make them count
    layer.bias[...] = jnp.asarray(rng.standard_normal(layer.bias.shape), jnp.float32)
  x = _features(2, 3, 4, 16)
  got = np.asarray(proj(jnp.asarray(x)))
  assert got.shape == (3, 4, 40) and got.dtype == np.float32
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(proj)))
  assert p["fc1"]["kernel"].shape == (16, 40 if hidden is None else hidden)
  pooled = x.astype(np.float64).reshape(3, 2, 2, 2, 2, 16).mean(axis=(2, 4)).reshape(3, 4, 16)
  h = pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  erf = np.vectorize(math.erf)
  h = 0.5 * h * (1 + erf(h / math.sqrt(2)))  # exact GELU, as torch.nn.GELU()
  want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
