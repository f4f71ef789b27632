"""SSD problem sizes and their random inputs, shared by the kernel tests (tests/kernels/)
and the GPU check (bench/ssd_check.py), so that both draw the same inputs for a seed.

Letters: B batch, T time, H heads, P head dim, N state, G groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Case:
  """The sizes and options of one SSD problem."""
  batch: int = 2
  seqlen: int = 37
  n_heads: int = 4
  head_dim: int = 8
  n_groups: int = 1
  d_state: int = 16
  chunk_len: int = 8
  dtype: str = "float32"
  with_D: bool = True
  with_initial_state: bool = False
  D_per_channel: bool = False


def make_inputs(case: Case, seed: int) -> dict[str, jax.Array]:
  """Fresh random inputs (never zeros) for `case`, x, B and C in the case's dtype:
  x [B, T, H, P], dt [B, T, H] (raw), A [H], B and C [B, T, G, N], dt_bias [H], and
  optionally D [H] or [H, P] and initial_state [B, H, P, N]."""
  keys = jax.random.split(jax.random.key(seed), 8)
  b, t, h, p, g, n = (case.batch, case.seqlen, case.n_heads, case.head_dim, case.n_groups,
                      case.d_state)
  dtype = jnp.dtype(case.dtype)
  inputs = dict(
      x=jax.random.normal(keys[0], (b, t, h, p)).astype(dtype),
      dt=jax.random.normal(keys[1], (b, t, h)) - 1.0,   # raw; softplus -> about 0.1..1.5
      A=-jnp.exp(jax.random.uniform(keys[2], (h,), minval=-1.0, maxval=1.0)),
      B=jax.random.normal(keys[3], (b, t, g, n)).astype(dtype),
      C=jax.random.normal(keys[4], (b, t, g, n)).astype(dtype),
      dt_bias=jax.random.uniform(keys[5], (h,), minval=-2.0, maxval=0.5),
  )
  if case.with_D:
    inputs["D"] = jax.random.normal(keys[6], (h, p) if case.D_per_channel else (h,))
  if case.with_initial_state:
    inputs["initial_state"] = jax.random.normal(keys[7], (b, h, p, n))
  return inputs


def random_cotangents(case: Case, seed: int) -> tuple[jax.Array, jax.Array]:
  """f32 cotangents of (y [B, T, H, P], final state [B, H, P, N])."""
  k1, k2 = jax.random.split(jax.random.key(seed + 1000))
  return (jax.random.normal(k1, (case.batch, case.seqlen, case.n_heads, case.head_dim)),
          jax.random.normal(k2, (case.batch, case.n_heads, case.head_dim, case.d_state)))
