"""A layer's two single-token matmuls as Pallas kernels (Triton lowering on GPU, the Pallas
interpreter elsewhere), each with the RMS norm before it computed inside, so that a layer's
step is three kernels (in_proj, `mixer_step`, out_proj) and a small conv-state update:

  in_proj(h, w, W)        = (rmsnorm(h) * w rounded to cd) @ W, rounded to cd      [R, Np]
  out_proj(g, ss, w, W, h) = h + ((g * r_group * w rounded to cd) @ W rounded to cd) [R, D]
                            with r_group = 1 / sqrt(sum of ss over the group's heads / (E/G)
                            + eps): the gated RMS norm from mixer_step's per-head sums

The same operations as `Mamba2Mixer.step`'s (Linear casts its input to cd, accumulates in
f32 and rounds its output to cd). Rows: R = 16 (the batch padded; tl.dot needs 16 rows);
only the first `rows` rows of g and ss are read, the others are taken as 0. The matrices'
output columns are split over the programs (block_n each), the contraction is a loop of
block_k rows. Np (in_proj's columns) must be a multiple of block_n: the caller pads W once.

Axis legend: R rows (padded batch), D model width, E inner width, H heads, G groups,
Np in_proj's padded output width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
f32 = jnp.float32
ROWS = 16


def _compiler(interpret: bool, num_warps: int, num_stages: int) -> dict:
  if interpret:
    return {"interpret": True}
  return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _check(name: str, size: int, block: int) -> None:
  if size % block:
    raise ValueError(f"decode gemv: {name} = {size} is not a multiple of the block {block}")


def _fit(block: int, size: int) -> int:
  """The largest power of two <= block that divides size (>= 16 for tl.dot)."""
  while block > 16 and size % block:
    block //= 2
  return block


def _in_proj_kernel(h_ref, w_norm_ref, w_ref, out_ref, *, eps, cd, block_k):
  d = h_ref.shape[1]
  n_blocks = d // block_k
  cols = pl.ds(pl.program_id(0) * out_ref.shape[1], out_ref.shape[1])

  def squares(k, acc):
    h = h_ref[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)]        # [R, bk]
    return acc + jnp.sum(h * h, axis=1)

  ss = lax.fori_loop(0, n_blocks, squares, jnp.zeros((h_ref.shape[0],), f32))
  scale = lax.rsqrt(ss / d + eps)                                             # [R]

  def body(k, acc):
    ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    u = (h_ref[:, ks] * scale[:, None] * w_norm_ref[ks][None, :]).astype(cd)  # [R, bk]
    return acc + jnp.dot(u, w_ref[ks, cols].astype(cd), preferred_element_type=f32)

  acc = lax.fori_loop(0, n_blocks, body, jnp.zeros(out_ref.shape, f32))
  out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def in_proj(h: Array, norm_weight: Array, kernel: Array, *, eps: float, block_n: int = 64,
            block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
            interpret: bool = False) -> Array:
  """h [R, D] f32, norm_weight [D], kernel [D, Np] (cd) -> [R, Np] in kernel's dtype."""
  rows, d = h.shape
  n = kernel.shape[1]
  block_k = _fit(block_k, d)
  _check("in_proj output width", n, block_n)
  _check("d_model", d, block_k)
  cd = kernel.dtype
  return pl.pallas_call(
      functools.partial(_in_proj_kernel, eps=eps, cd=cd, block_k=block_k),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((rows, d), lambda j: (0, 0)),
                pl.BlockSpec((d,), lambda j: (0,)),
                pl.BlockSpec((d, n), lambda j: (0, 0))],
      out_specs=pl.BlockSpec((rows, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, n), cd),
      **_compiler(interpret, num_warps, num_stages))(h.astype(f32), norm_weight.astype(f32),
                                                      kernel)


def _out_proj_kernel(g_ref, ss_ref, w_norm_ref, w_ref, h_ref, out_ref, *, eps, cd, block_k,
                     n_groups, rows):
  r, e = g_ref.shape
  group = e // n_groups
  hpg = ss_ref.shape[1] // n_groups
  live = lax.broadcasted_iota(jnp.int32, (r, 1), 0) < rows                   # [R, 1]
  cols = pl.ds(pl.program_id(0) * out_ref.shape[1], out_ref.shape[1])
  blocks_per_group = group // block_k

  # The group's per-head sums in pieces of a power of two (Triton's loads need one).
  piece = hpg & -hpg

  def group_body(gi, acc):
    ss = jnp.zeros((r,), f32)
    for j in range(hpg // piece):
      ss = ss + jnp.sum(ss_ref[:, pl.ds(gi * hpg + j * piece, piece)], axis=1)  # [R]
    scale = jnp.where(live[:, 0], lax.rsqrt(ss / group + eps), 0.0)

    def body(k, acc):
      ks = pl.ds(pl.multiple_of(gi * group + k * block_k, block_k), block_k)
      g = jnp.where(live, g_ref[:, ks], 0.0)
      u = (g * scale[:, None] * w_norm_ref[ks][None, :]).astype(cd)          # [R, bk]
      return acc + jnp.dot(u, w_ref[ks, cols].astype(cd), preferred_element_type=f32)

    return lax.fori_loop(0, blocks_per_group, body, acc)

  acc = lax.fori_loop(0, n_groups, group_body, jnp.zeros(out_ref.shape, f32))
  out_ref[...] = h_ref[:, cols] + acc.astype(cd).astype(f32)


@functools.partial(jax.jit, static_argnames=("eps", "n_groups", "rows", "block_n", "block_k",
                                             "num_warps", "num_stages", "interpret"))
def out_proj(gated: Array, ss: Array, norm_weight: Array, kernel: Array, h: Array, *,
             eps: float, n_groups: int, rows: int, block_n: int = 16, block_k: int = 256,
             num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> Array:
  """gated [R, E] f32 and ss [R, H] f32 (rows >= `rows` ignored), norm_weight [E], kernel
  [E, D] (cd), h [R, D] f32 -> the new residual stream h + out_proj(...) [R, D] f32."""
  r, e = gated.shape
  d = kernel.shape[1]
  block_n, block_k = _fit(block_n, d), _fit(block_k, e // n_groups)
  _check("d_model", d, block_n)
  _check("d_inner / n_groups", e // n_groups, block_k)
  return pl.pallas_call(
      functools.partial(_out_proj_kernel, eps=eps, cd=kernel.dtype, block_k=block_k,
                        n_groups=n_groups, rows=rows),
      grid=(d // block_n,),
      in_specs=[pl.BlockSpec((r, e), lambda j: (0, 0)),
                pl.BlockSpec(ss.shape, lambda j: (0, 0)),
                pl.BlockSpec((e,), lambda j: (0,)),
                pl.BlockSpec((e, d), lambda j: (0, 0)),
                pl.BlockSpec((r, d), lambda j: (0, 0))],
      out_specs=pl.BlockSpec((r, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((r, d), f32),
      **_compiler(interpret, num_warps, num_stages))(gated, ss, norm_weight.astype(f32),
                                                      kernel, h)
