"""From vision features to LLM tokens: 2D bilinear pooling of the patch grid, then a
2-layer GELU MLP (vision width -> LLM width).

Pooling by a factor s resizes the G x G grid to ceil(G / s) x ceil(G / s) with bilinear
interpolation at half-pixel centres and no antialiasing (PyTorch's
`F.interpolate(mode="bilinear", align_corners=False)`, as LLaVA-style 2D pooling does). When s
divides G and s = 2, every output sample falls exactly between four inputs, so this is 2 x 2
average pooling: CLIP-L-336's 24 x 24 grid becomes 12 x 12 = 144 tokens per frame. For other
sizes (SigLIP's 27 x 27 -> 14 x 14) it interpolates.

Axis legend: B images, G patch grid side, K patches (G*G), R pooled grid side, J pooled
tokens (R*R), D vision width, M projector hidden width, C LLM width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def pooled_side(grid: int, factor: int) -> int:
  """R: side of the pooled grid for a G x G grid pooled by `factor`."""
  if factor < 1:
    raise ValueError(f"pooling factor must be >= 1, got {factor}")
  return math.ceil(grid / factor)


def pool_patch_grid(features: Array, factor: int) -> Array:
  """features [B, K, D] (K = G*G, row-major) -> [B, J, D] (J = R*R), bilinear, no antialias.

  Computed in float32 whatever the input dtype; returns the input dtype.
  """
  b, k, d = features.shape
  grid = math.isqrt(k)
  if grid * grid != k:
    raise ValueError(f"pooling needs a square patch grid, got {k} tokens")
  side = pooled_side(grid, factor)
  if side == grid:
    return features
  x = features.reshape(b, grid, grid, d).astype(jnp.float32)  # [B, G, G, D]
  # antialias=False: a plain 2-tap bilinear filter. With antialiasing the filter would
  # widen with the scale (weights 1/8, 3/8, 3/8, 1/8 for a halving), which is not the
  # paper's pooling.
  y = jax.image.resize(x, (b, side, side, d), method="bilinear", antialias=False)
  return y.reshape(b, side * side, d).astype(features.dtype)


class Projector(nnx.Module):
  """Pooling then fc1 -> GELU (exact, erf) -> fc2. State paths: fc1/{kernel,bias},
  fc2/{kernel,bias}."""

  def __init__(self, vision_width: int, llm_width: int, *, hidden_width: int | None = None,
               pool_factor: int = 2, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    hidden_width = llm_width if hidden_width is None else hidden_width
    self.pool_factor = pool_factor
    self.fc1 = nnx.Linear(vision_width, hidden_width, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_width, llm_width, dtype=dtype, rngs=rngs)

  def __call__(self, features: Array) -> Array:
    """features [B, K, D] -> LLM tokens [B, J, C] float32."""
    pooled = pool_patch_grid(features, self.pool_factor)  # [B, J, D]
    hidden = jax.nn.gelu(self.fc1(pooled), approximate=False)  # [B, J, M]
    return self.fc2(hidden).astype(jnp.float32)  # [B, J, C]
