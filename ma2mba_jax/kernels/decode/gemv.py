"""A layer's two single-token matmuls as Pallas kernels (Triton lowering on GPU, the Pallas
interpreter elsewhere), each with the RMS norm before it computed inside, so that a layer's
step is three kernels (in_proj, `mixer_step`, out_proj) and a small conv-state update:

  in_proj(h, w, Wt)        = (rmsnorm(h) * w rounded to cd) @ Wt^T, rounded to cd    [R, Np]
  out_proj(g, ss, w, Wt, h) = h + ((g * r_group * w rounded to cd) @ Wt^T rounded to cd)
                             with r_group = 1 / sqrt(sum of ss over the group's heads / (E/G)
                             + eps): the gated RMS norm from mixer_step's per-head sums [R, D]

The same operations as `Mamba2Mixer.step`'s (Linear casts its input to cd, accumulates in
f32 and rounds its output to cd). At batch 1 both are weight-bandwidth bound (54 + 26 MB a
layer for the 2.7B LM in bf16), so:

  * the matrices are stored TRANSPOSED, output major: Wt [Np, D] for in_proj, [D, E] for
    out_proj (`models/decode.padded_decode_weights` makes them once), so that a program
    reads block_n whole rows of the contraction, contiguous, and the output columns can be
    split finely (thousands of programs for in_proj, hundreds for out_proj) with long
    contiguous reads whatever block_n is;
  * rows: R <= VEC_ROWS rows (no padding) take the vector path, no tl.dot: each program
    loads a [block_n, block_k] tile of Wt once and, for each live row, multiplies it by
    the row's [block_k] slice (f32 products of the cd values, which are exact for bf16)
    into a [block_n, block_k] f32 accumulator, summed along the contraction once after
    the loop; R = ROWS = 16 rows take the tl.dot path (the tile and the rows' [16,
    block_k] slice through one tl.dot, f32 accumulation). `padded_rows(B)` says how many
    rows a batch of B is given;
  * split_k > 1 (optional): the contraction is split over split_k programs too; each
    writes an f32 partial [split_k, R, N] and a small XLA epilogue sums the partials in f32
    and rounds once to cd (+ h for out_proj): the same rounding as split_k = 1, only the
    f32 summation order differs.

Rounding: identical to the f32-accumulated matmul of the cd-rounded normalised input; the
vector path sums the products in another order than tl.dot/XLA (f32 either way). The sums
of squares (in_proj's norm) are taken over all of h by every program, as before.

Rows >= `rows` of g and ss (out_proj) are never read: out_proj returns h there; in_proj
computes every one of its R rows (the caller's padding rows are zero, so they give 0).
Np (in_proj's rows of Wt) must be a multiple of block_n: the caller pads Wt once.

Axis legend: R rows (batch, padded to ROWS on the tl.dot path), D model width, E inner
width, H heads, G groups, Np in_proj's padded output width, S split_k.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
f32 = jnp.float32
ROWS = 16        # the tl.dot path's rows (tl.dot needs 16)
VEC_ROWS = 4     # batches up to this many rows take the vector path, unpadded
_NT = (((1,), (1,)), ((), ()))   # a @ b^T


class Config(NamedTuple):
  """One kernel's launch configuration. block_n: output columns (rows of Wt) a program;
  block_k: the contraction's step; split_k: programs a column block's contraction is split
  over; num_warps / num_stages: Triton's. Blocks are shrunk to powers of two that divide
  the shapes (see `effective`). unroll: the contraction's loop unrolled in the program
  (every tile's load issued up front) instead of a loop that Triton may pipeline over
  num_stages."""
  block_n: int
  block_k: int
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 1
  unroll: bool = False


# From `python -m ma2mba_jax.bench.gemv` on one H100 (docs/bench/h100_r9/gemv_sweep.* and
# gemv_confirm.*), the 2.7B shapes: batch 1 (vector path) the fastest of the first sweep
# (whose vector path still reduced every step); within 2-4% of the best GPU time of the
# second (26.7 us in_proj, 13.8 us out_proj, ~2.0 TB/s; split_k=2 was 4% faster for
# out_proj with its epilogue kernel, not taken). 16 rows (tl.dot path): the fastest of 4.
DEFAULTS = {
    ("in_proj", "vec"): Config(block_n=8, block_k=512, num_warps=2, num_stages=3),
    ("in_proj", "dot"): Config(block_n=32, block_k=128, num_warps=4, num_stages=3),
    ("out_proj", "vec"): Config(block_n=4, block_k=1024, num_warps=2, num_stages=3),
    ("out_proj", "dot"): Config(block_n=32, block_k=128, num_warps=4, num_stages=3),
}
# The vector path's accumulators ([block_n, block_k] f32 a row) are kept to 128 registers
# a thread: block_k is halved until block_n * block_k * rows <= _ACC_PER_WARP * num_warps.
_ACC_PER_WARP = 4096


def padded_rows(batch: int) -> int:
  """The rows a batch of `batch` is given: itself up to VEC_ROWS (vector path), else ROWS."""
  if batch > ROWS:
    raise ValueError(f"decode gemv: at most {ROWS} rows, got {batch}")
  return batch if batch <= VEC_ROWS else ROWS


def path_of(rows: int) -> str:
  """'vec' (rows <= VEC_ROWS) or 'dot' (rows == ROWS)."""
  if rows <= VEC_ROWS:
    return "vec"
  if rows == ROWS:
    return "dot"
  raise ValueError(f"decode gemv: {rows} rows; pass padded_rows(batch) rows "
                   f"(<= {VEC_ROWS}, or {ROWS})")


def _compiler(interpret: bool, config: Config) -> dict:
  if interpret:
    return {"interpret": True}
  return {"compiler_params": plgpu.CompilerParams(num_warps=config.num_warps,
                                                  num_stages=config.num_stages)}


def _fit(block: int, size: int, floor: int) -> int:
  """The largest power of two <= block that divides size (not below floor: tl.dot's 16)."""
  block = 1 << (max(block, floor).bit_length() - 1)
  while block > floor and size % block:
    block //= 2
  if size % block:
    raise ValueError(f"decode gemv: {size} has no power-of-two block >= {floor} dividing it")
  return block


def _split(split: int, n_blocks: int, per_group: int) -> int:
  """The largest split <= split that divides the n_blocks contraction blocks into pieces
  that each lie in one group or cover whole groups (per_group blocks a group)."""
  for s in range(max(split, 1), 0, -1):
    k = n_blocks // s
    if n_blocks % s == 0 and (per_group % k == 0 or k % per_group == 0):
      return s
  return 1


def effective(kernel: str, rows: int, n: int, k: int, n_groups: int = 1,
              config: Config | None = None) -> Config:
  """The configuration the kernel `kernel` ('in_proj' | 'out_proj') runs with for `rows`
  rows, n output columns and contraction k: `config` (default: DEFAULTS) with its blocks
  fitted to the shapes (and the vector path's block_k to its registers, _ACC_PER_WARP)."""
  path = path_of(rows)
  config = config or DEFAULTS[(kernel, path)]
  floor = 16 if path == "dot" else 1
  block_n = _fit(config.block_n, n, floor)
  group = k // n_groups
  block_k = _fit(config.block_k, group, floor)
  while path == "vec" and block_k > 16 and block_n * block_k * rows > (
      _ACC_PER_WARP * config.num_warps):
    block_k //= 2
  split = _split(config.split_k, k // block_k, group // block_k)
  return config._replace(block_n=block_n, block_k=block_k, split_k=split)


def _rows(r: int, vec: bool) -> list:
  """The row selections a program works on: each row alone (vector path), or all (dot)."""
  return [pl.ds(i, 1) for i in range(r)] if vec else [slice(None)]


def _contract(acc: Array, u: Array, w: Array, vec: bool) -> Array:
  """acc plus u [1 | R, bk] (cd) times the tile w [bn, bk] (cd). Vector path: acc [bn, bk]
  f32, the products added elementwise (summed over bk once, by `_total`, after the loop);
  tl.dot path: acc [R, bn] f32."""
  if vec:
    return acc + u.astype(f32) * w.astype(f32)
  return acc + lax.dot_general(u, w, _NT, preferred_element_type=f32)


def _total(acc: Array, vec: bool) -> Array:
  """The accumulator as [1 | R, bn] f32."""
  return jnp.sum(acc, axis=1)[None, :] if vec else acc


def _chunk(k, size: int):
  """The k-th slice of `size` (k a Python int when the loop is unrolled)."""
  return pl.ds(k * size if isinstance(k, int) else pl.multiple_of(k * size, size), size)


def _loop(n: int, body, init, unroll: bool):
  """fori_loop(0, n, body, init), or the same unrolled in Python."""
  if not unroll:
    return lax.fori_loop(0, n, body, init)
  for k in range(n):
    init = body(k, init)
  return init


def _in_proj_kernel(h_ref, w_norm_ref, w_ref, out_ref, *, eps, cd, block_k, k_blocks, vec,
                    unroll):
  r, d = h_ref.shape
  bn = out_ref.shape[-1]
  cols = pl.ds(pl.program_id(0) * bn, bn)
  k0 = pl.program_id(1) * k_blocks                      # this split's first block
  chunk = lambda k: _chunk(k, block_k)
  sel = _rows(r, vec)
  width = 1 if vec else r

  # The vector path sums the squares in pieces of up to 1024, unrolled (their loads issued
  # at once: one latency); the tl.dot path, with 16 rows, in a loop of block_k.
  piece = _fit(1024, d, 1) if vec else block_k

  def squares(k, acc):
    out = []
    for a, s in zip(acc, sel):
      x = h_ref[s, _chunk(k, piece)]                                           # [1|R, pc]
      out.append(a + jnp.sum(x * x, axis=1))
    return tuple(out)

  ss = _loop(d // piece, squares, tuple(jnp.zeros((width,), f32) for _ in sel),
             unroll=vec and d // piece <= 16)
  scales = [lax.rsqrt(s / d + eps) for s in ss]                                # [1|R] each

  def body(k, acc):
    ks = chunk(k0 + k)
    w = w_ref[cols, ks]                                                        # [bn, bk]
    w_norm = w_norm_ref[ks][None, :]
    out = []
    for a, s, scale in zip(acc, sel, scales):
      u = (h_ref[s, ks] * scale[:, None] * w_norm).astype(cd)                  # [1|R, bk]
      out.append(_contract(a, u, w.astype(cd), vec))
    return tuple(out)

  shape = (bn, block_k) if vec else (r, bn)
  acc = _loop(k_blocks, body, tuple(jnp.zeros(shape, f32) for _ in sel), unroll)
  for a, s in zip(acc, sel):
    out_ref[s, :] = _total(a, vec).astype(out_ref.dtype)                     # [1|R, bn]


def _output(rows: int, cols: int, block_n: int, split: int, dtype: Any
            ) -> tuple[pl.BlockSpec, jax.ShapeDtypeStruct]:
  """A gemv call's output block and shape over the grid (column block j, split s): the
  [R, N] result in `dtype`, or with split-K the f32 partials [S, R, N] the caller sums."""
  if split == 1:
    return (pl.BlockSpec((rows, block_n), lambda j, s: (0, j)),
            jax.ShapeDtypeStruct((rows, cols), dtype))
  return (pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
          jax.ShapeDtypeStruct((split, rows, cols), f32))


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def in_proj(h: Array, norm_weight: Array, kernel_t: Array, *, eps: float,
            config: Config | None = None, interpret: bool = False) -> Array:
  """h [R, D] f32 (R = padded_rows(B)), norm_weight [D], kernel_t [Np, D] (cd: in_proj's
  kernel transposed) -> [R, Np] in kernel_t's dtype."""
  r, d = h.shape
  n = kernel_t.shape[0]
  vec = path_of(r) == "vec"
  cfg = effective("in_proj", r, n, d, 1, config)
  bn, bk, split = cfg.block_n, cfg.block_k, cfg.split_k
  cd = kernel_t.dtype
  k_blocks = d // bk // split
  out_spec, out_shape = _output(r, n, bn, split, cd)
  out = pl.pallas_call(
      functools.partial(_in_proj_kernel, eps=eps, cd=cd, block_k=bk, k_blocks=k_blocks,
                        vec=vec, unroll=cfg.unroll),
      grid=(n // bn, split),
      in_specs=[pl.BlockSpec((r, d), lambda j, s: (0, 0)),
                pl.BlockSpec((d,), lambda j, s: (0,)),
                pl.BlockSpec((n, d), lambda j, s: (0, 0))],
      out_specs=out_spec, out_shape=out_shape,
      **_compiler(interpret, cfg))(h.astype(f32), norm_weight.astype(f32), kernel_t)
  if split > 1:   # the partials' f32 sum, rounded once
    out = jnp.sum(out, axis=0).astype(cd)
  return out


def _out_proj_kernel(g_ref, ss_ref, w_norm_ref, w_ref, h_ref, out_ref, *, eps, cd, block_k,
                     k_blocks, n_groups, rows, vec, final, unroll):
  r, e = g_ref.shape
  group = e // n_groups
  hpg = ss_ref.shape[1] // n_groups
  per_group = group // block_k
  seg = min(k_blocks, per_group)             # blocks of one group in a row
  bn = out_ref.shape[-1]
  cols = pl.ds(pl.program_id(0) * bn, bn)
  k0 = pl.program_id(1) * k_blocks
  chunk = lambda k: _chunk(k, block_k)
  sel = _rows(min(r, rows), vec)             # vector path: the live rows only
  width = 1 if vec else r
  live = lax.broadcasted_iota(jnp.int32, (r, 1), 0) < rows                   # [R, 1]
  # The group's per-head sums in pieces of a power of two (Triton's loads need one).
  piece = hpg & -hpg

  def seg_body(t, acc):
    first = k0 + t * seg
    gi = first // per_group
    scales = []
    for s in sel:
      ss = jnp.zeros((width,), f32)
      for j in range(hpg // piece):
        ss = ss + jnp.sum(ss_ref[s, pl.ds(gi * hpg + j * piece, piece)], axis=1)  # [1|R]
      scale = lax.rsqrt(ss / group + eps)
      scales.append(scale if vec else jnp.where(live[:, 0], scale, 0.0))

    def body(k, acc):
      ks = chunk(first + k)
      w = w_ref[cols, ks]                                                      # [bn, bk]
      w_norm = w_norm_ref[ks][None, :]
      out = []
      for a, s, scale in zip(acc, sel, scales):
        g = g_ref[s, ks]                                                       # [1|R, bk]
        if not vec:
          g = jnp.where(live, g, 0.0)
        u = (g * scale[:, None] * w_norm).astype(cd)
        out.append(_contract(a, u, w.astype(cd), vec))
      return tuple(out)

    return _loop(seg, body, acc, unroll)

  shape = (bn, block_k) if vec else (r, bn)
  acc = _loop(k_blocks // seg, seg_body, tuple(jnp.zeros(shape, f32) for _ in sel), unroll)
  acc = [_total(a, vec) for a in acc]                                        # [1|R, bn]
  for a, s in zip(acc, sel):
    out_ref[s, :] = h_ref[s, cols] + a.astype(cd).astype(f32) if final else a
  if vec:   # the rows past `rows`: h itself (final) or nothing (a zero partial)
    for i in range(len(sel), r):
      out_ref[pl.ds(i, 1), :] = (h_ref[pl.ds(i, 1), cols] if final
                                 else jnp.zeros((1, bn), f32))


@functools.partial(jax.jit, static_argnames=("eps", "n_groups", "rows", "config",
                                             "interpret"))
def out_proj(gated: Array, ss: Array, norm_weight: Array, kernel_t: Array, h: Array, *,
             eps: float, n_groups: int, rows: int | None = None, config: Config | None = None,
             interpret: bool = False) -> Array:
  """gated [R, E] f32 and ss [R, H] f32 (R = padded_rows(B); rows >= `rows`, default R,
  never read), norm_weight [E], kernel_t [D, E] (cd: out_proj's kernel transposed), h
  [R, D] f32 -> the new residual stream h + out_proj(...) [R, D] f32."""
  r, e = gated.shape
  d = kernel_t.shape[0]
  rows = r if rows is None else rows
  vec = path_of(r) == "vec"
  cfg = effective("out_proj", r, d, e, n_groups, config)
  bn, bk, split = cfg.block_n, cfg.block_k, cfg.split_k
  cd = kernel_t.dtype
  out_spec, out_shape = _output(r, d, bn, split, f32)
  out = pl.pallas_call(
      functools.partial(_out_proj_kernel, eps=eps, cd=cd, block_k=bk,
                        k_blocks=e // bk // split, n_groups=n_groups, rows=rows, vec=vec,
                        final=split == 1, unroll=cfg.unroll),
      grid=(d // bn, split),
      in_specs=[pl.BlockSpec((r, e), lambda j, s: (0, 0)),
                pl.BlockSpec(ss.shape, lambda j, s: (0, 0)),
                pl.BlockSpec((e,), lambda j, s: (0,)),
                pl.BlockSpec((d, e), lambda j, s: (0, 0)),
                pl.BlockSpec((r, d), lambda j, s: (0, 0))],
      out_specs=out_spec, out_shape=out_shape,
      **_compiler(interpret, cfg))(gated, ss, norm_weight.astype(f32), kernel_t,
                                   h.astype(f32))
  if split > 1:   # the partials' f32 sum, rounded once to cd, + h
    out = h.astype(f32) + jnp.sum(out, axis=0).astype(cd).astype(f32)
  return out


__all__ = ["ROWS", "VEC_ROWS", "Config", "DEFAULTS", "padded_rows", "path_of", "effective",
           "in_proj", "out_proj"]
