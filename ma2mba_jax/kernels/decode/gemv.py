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
    f32 summation order differs;
  * programs > 0 (vector path, no split-K; in_proj's default): a fixed number of
    persistent programs, each normalising the input once and then looping over column
    blocks, instead of one program per column block that each re-read and re-normalise
    the whole input from the L2 (the same sums, bit for bit);
  * eviction="evict_first" streams the weights past the L2; ahead=True loads each tile one
    contraction step before its use (out_proj's default).

Two more functions serve `fused_decode_step(matmul="reduce")`, whose norms are folded as
the fused step's: `in_proj_reduce` (in_proj as XLA's multiply-and-reduce, not a kernel
here: XLA's reduction emitter streams the matrix faster at one row; the sum of squares of
h in a padding row) and `out_proj_folded` (a kernel: the mixer's yw = g * w in cd @ Wt^T,
each group's part times its 1/rms, rounded, + h; it also writes the next layer's h * w).

Rounding: identical to the f32-accumulated matmul of the cd-rounded normalised input; the
vector path sums the products in another order than tl.dot/XLA (f32 either way). The sums
of squares (in_proj's norm) are taken over all of h by every program.

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
  num_stages. eviction: the weight tiles' L2 eviction policy (Triton's "evict_first" or
  "evict_last"; None: the default). Each weight is read once a token, so evict_first
  leaves the L2 to what is read again. ahead: each weight tile is loaded one step of the
  contraction before it is used (the first one before the program's norm prologue), so its
  memory latency overlaps the arithmetic before it (software pipelining in registers,
  which Triton's num_stages does not do for num_stages=1). programs (vector path, no
  split-K): 0 = one program per block of block_n columns; > 0 = that many programs, each
  normalising the input rows ONCE and then looping over column blocks pid, pid + programs,
  ...: the input is read from the L2 `programs` times instead of once per column block
  (with the grid of thousands of small programs, those re-reads are ~0.75x the weight
  bytes for in_proj); every tile of a block is loaded at once (the contraction unrolled)."""
  block_n: int
  block_k: int
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 1
  unroll: bool = False
  eviction: str | None = None
  ahead: bool = False
  programs: int = 0


# From `python -m ma2mba_jax.bench.gemv` and the 2.7B LM's decoding on one H100 (BENCHMARKS.md;
# docs/bench/h100_r9 and h100_r10), the 2.7B shapes. Batch 1-4 (vector path): in_proj with
# 528 persistent programs (4 an SM; 24.5 us a layer in the decode step against 27.0 for
# the grid of 1344 programs), out_proj with evict_first and tiles loaded one step ahead
# (11.5-12.4 us against 13.0); session 9's configs otherwise. 16 rows (tl.dot path): the
# fastest of 4.
DEFAULTS = {
    ("in_proj", "vec"): Config(block_n=8, block_k=512, num_warps=4, num_stages=1,
                               eviction="evict_first", programs=528),
    ("in_proj", "dot"): Config(block_n=32, block_k=128, num_warps=4, num_stages=3),
    ("out_proj", "vec"): Config(block_n=4, block_k=1024, num_warps=4, num_stages=1,
                                eviction="evict_first", ahead=True),
    ("out_proj", "dot"): Config(block_n=32, block_k=128, num_warps=4, num_stages=3),
}
# The vector path's accumulators ([block_n, block_k] f32 a row) are kept to 128 registers
# a thread: block_k is halved until block_n * block_k * rows <= _ACC_PER_WARP * num_warps.
_ACC_PER_WARP = 4096
# The persistent kernels (Config.programs) hold a row's whole normalised input in registers,
# in at most this many block_k pieces.
_MAX_UNROLLED = 16


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
  fitted to the shapes (and the vector path's block_k to its registers, _ACC_PER_WARP);
  with persistent programs, unroll=True and ahead=False, as those kernels run."""
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
  programs = config.programs
  if path != "vec" or split > 1 or k // block_k > _MAX_UNROLLED:
    programs = 0
  config = config._replace(block_n=block_n, block_k=block_k, split_k=split,
                           programs=min(programs, n // block_n))
  if config.programs:   # the persistent kernels load a block's tiles at once
    config = config._replace(unroll=True, ahead=False)
  return config


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


def _tile(w_ref, cols, ks, eviction: str | None) -> Array:
  """The weight tile w_ref[cols, ks] [bn, bk], loaded with `eviction` when given."""
  if eviction is None:
    return w_ref[cols, ks]
  return plgpu.load(w_ref.at[cols, ks], eviction_policy=eviction)


def _stream(n: int, load, step, acc, *, unroll: bool, ahead: bool, first=None):
  """acc after step(k, acc, load(k)) for k = 0 .. n-1. ahead: tile k + 1 is loaded before
  step k runs (tile 0 is `first`, loaded by the caller before its prologue)."""
  if not ahead:
    return _loop(n, lambda k, a: step(k, a, load(k)), acc, unroll)

  def body(k, carry):
    a, tile = carry
    nxt = load(k + 1)
    return step(k, a, tile), nxt

  acc, tile = _loop(n - 1, body, (acc, first), unroll)
  return step(n - 1, acc, tile)


def _inv_rms(h_ref, sel: list, width: int, piece: int, eps: float, unroll: bool) -> list:
  """1 / rms(h) of each row selection of h_ref [R, D] ([1 | R] f32 each): the squares summed
  in pieces of `piece`, in order."""
  d = h_ref.shape[1]

  def squares(k, acc):
    out = []
    for a, s in zip(acc, sel):
      x = h_ref[s, _chunk(k, piece)]                                           # [1|R, pc]
      out.append(a + jnp.sum(x * x, axis=1))
    return tuple(out)

  ss = _loop(d // piece, squares, tuple(jnp.zeros((width,), f32) for _ in sel), unroll)
  return [lax.rsqrt(s / d + eps) for s in ss]


def _group_inv_rms(ss_ref, s, group_index, hpg: int, width: int, group: int,
                   eps: float) -> Array:
  """The gated norm's 1 / rms of group `group_index` for rows s ([1 | R] f32): the group's hpg
  columns of per-head sums of squares in ss_ref [R, G * hpg], added in pieces of a power of
  two (Triton's loads need one), in order, over its `group` channels."""
  piece = hpg & -hpg
  ss = jnp.zeros((width,), f32)
  for j in range(hpg // piece):
    ss = ss + jnp.sum(ss_ref[s, pl.ds(group_index * hpg + j * piece, piece)], axis=1)
  return lax.rsqrt(ss / group + eps)


def _in_proj_kernel(h_ref, w_norm_ref, w_ref, out_ref, *, eps, cd, block_k, k_blocks, vec,
                    unroll, eviction, ahead):
  r, d = h_ref.shape
  bn = out_ref.shape[-1]
  cols = pl.ds(pl.program_id(0) * bn, bn)
  k0 = pl.program_id(1) * k_blocks                      # this split's first block
  chunk = lambda k: _chunk(k, block_k)
  sel = _rows(r, vec)
  width = 1 if vec else r

  load = lambda k: _tile(w_ref, cols, chunk(k0 + k), eviction)                 # [bn, bk]
  first = load(0) if ahead else None
  # The vector path sums the squares in pieces of up to 1024, unrolled (their loads issued
  # at once: one latency); the tl.dot path, with 16 rows, in a loop of block_k.
  piece = _fit(1024, d, 1) if vec else block_k
  scales = _inv_rms(h_ref, sel, width, piece, eps, unroll=vec and d // piece <= 16)

  def step(k, acc, w):
    ks = chunk(k0 + k)
    w_norm = w_norm_ref[ks][None, :]
    out = []
    for a, s, scale in zip(acc, sel, scales):
      u = (h_ref[s, ks] * scale[:, None] * w_norm).astype(cd)                  # [1|R, bk]
      out.append(_contract(a, u, w.astype(cd), vec))
    return tuple(out)

  shape = (bn, block_k) if vec else (r, bn)
  acc = _stream(k_blocks, load, step, tuple(jnp.zeros(shape, f32) for _ in sel),
                unroll=unroll, ahead=ahead, first=first)
  for a, s in zip(acc, sel):
    out_ref[s, :] = _total(a, vec).astype(out_ref.dtype)                     # [1|R, bn]


def round_to(x: Array, dtype) -> Array:
  """x rounded to `dtype`'s precision, kept in x's dtype. Not x.astype(dtype).astype(f32):
  XLA on GPU may drop that round trip inside a fusion (its default excess precision), which
  left split-K's out_proj unrounded there (tests/gpu/test_decode_gpu.py)."""
  info = jnp.finfo(dtype)
  return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _column_blocks(n_blocks: int, programs: int, block) -> None:
  """block(j) for this program's column blocks j = pid, pid + programs, ... < n_blocks."""
  pid = pl.program_id(0)
  count = (n_blocks - pid + programs - 1) // programs

  def body(t, carry):
    block(pid + t * programs)
    return carry

  lax.fori_loop(0, count, body, 0)


def _dot_block(u: list, tiles: list) -> Array:
  """The vector path's product of one row's normalised pieces u ([1, bk] cd each) with a
  column block's tiles ([bn, bk] cd each): [1, bn] f32, summed as `_contract` / `_total`."""
  acc = jnp.zeros(tiles[0].shape, f32)
  for uk, wk in zip(u, tiles):
    acc = _contract(acc, uk, wk, True)
  return _total(acc, True)


def _in_proj_persistent(h_ref, w_norm_ref, w_ref, out_ref, *, eps, cd, block_k, block_n,
                        programs, eviction):
  """in_proj with Config.programs > 0 (vector path): the same sums as _in_proj_kernel."""
  r, d = h_ref.shape
  kb = d // block_k
  chunk = lambda k: _chunk(k, block_k)
  sel = _rows(r, True)
  # The squares as _in_proj_kernel's vector path sums them.
  scales = _inv_rms(h_ref, sel, 1, _fit(1024, d, 1), eps, unroll=True)
  u = [[(h_ref[s, chunk(k)] * scale[:, None] * w_norm_ref[chunk(k)][None, :]).astype(cd)
        for k in range(kb)] for s, scale in zip(sel, scales)]   # per row: kb [1, bk] cd

  def block(j):
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    tiles = [_tile(w_ref, cols, chunk(k), eviction).astype(cd) for k in range(kb)]
    for i in range(r):
      out_ref[pl.ds(i, 1), cols] = _dot_block(u[i], tiles).astype(out_ref.dtype)

  _column_blocks(out_ref.shape[-1] // block_n, programs, block)


def _out_proj_persistent(g_ref, ss_ref, w_norm_ref, w_ref, h_ref, out_ref, *, eps, cd,
                         block_k, block_n, n_groups, rows, programs, eviction):
  """out_proj with Config.programs > 0 (vector path, split_k = 1): the same sums as
  _out_proj_kernel; rows >= `rows` get h."""
  r, e = g_ref.shape
  group = e // n_groups
  hpg = ss_ref.shape[1] // n_groups
  kb = e // block_k
  chunk = lambda k: _chunk(k, block_k)
  u = []                                        # per live row: kb pieces [1, bk] cd
  for s in _rows(min(r, rows), True):
    scales = [_group_inv_rms(ss_ref, s, gi, hpg, 1, group, eps) for gi in range(n_groups)]
    u.append([(g_ref[s, chunk(k)] * scales[k * block_k // group][:, None]
               * w_norm_ref[chunk(k)][None, :]).astype(cd) for k in range(kb)])

  def block(j):
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    tiles = [_tile(w_ref, cols, chunk(k), eviction).astype(cd) for k in range(kb)]
    for i in range(r):
      h = h_ref[pl.ds(i, 1), cols]
      out_ref[pl.ds(i, 1), cols] = (h + _dot_block(u[i], tiles).astype(cd).astype(f32)
                                    if i < len(u) else h)

  _column_blocks(out_ref.shape[-1] // block_n, programs, block)


def _whole(shape: tuple[int, ...]) -> pl.BlockSpec:
  """The whole array as every program's block, on a grid of any rank."""
  return pl.BlockSpec(shape, lambda *ids: (0,) * len(shape))


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
  if cfg.programs:   # (split_k is 1 then)
    kernel = functools.partial(_in_proj_persistent, eps=eps, cd=cd, block_k=bk, block_n=bn,
                               programs=cfg.programs, eviction=cfg.eviction)
    grid = (cfg.programs,)
    out_spec, out_shape = _whole((r, n)), jax.ShapeDtypeStruct((r, n), cd)
  else:
    kernel = functools.partial(_in_proj_kernel, eps=eps, cd=cd, block_k=bk,
                               k_blocks=d // bk // split, vec=vec, unroll=cfg.unroll,
                               eviction=cfg.eviction, ahead=cfg.ahead)
    grid = (n // bn, split)
    out_spec, out_shape = _output(r, n, bn, split, cd)
  out = pl.pallas_call(
      kernel, grid=grid, in_specs=[_whole((r, d)), _whole((d,)), _whole((n, d))],
      out_specs=out_spec, out_shape=out_shape,
      **_compiler(interpret, cfg))(h.astype(f32), norm_weight.astype(f32), kernel_t)
  if split > 1:   # the partials' f32 sum, rounded once
    out = jnp.sum(out, axis=0).astype(cd)
  return out


def _out_proj_kernel(g_ref, ss_ref, w_norm_ref, w_ref, h_ref, out_ref, *, eps, cd, block_k,
                     k_blocks, n_groups, rows, vec, final, unroll, eviction, ahead):
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

  def seg_body(t, acc):
    first = k0 + t * seg
    load = lambda k: _tile(w_ref, cols, chunk(first + k), eviction)           # [bn, bk]
    tile0 = load(0) if ahead else None
    gi = first // per_group
    scales = []
    for s in sel:
      scale = _group_inv_rms(ss_ref, s, gi, hpg, width, group, eps)            # [1|R]
      scales.append(scale if vec else jnp.where(live[:, 0], scale, 0.0))

    def step(k, acc, w):
      ks = chunk(first + k)
      w_norm = w_norm_ref[ks][None, :]
      out = []
      for a, s, scale in zip(acc, sel, scales):
        g = g_ref[s, ks]                                                       # [1|R, bk]
        if not vec:
          g = jnp.where(live, g, 0.0)
        u = (g * scale[:, None] * w_norm).astype(cd)
        out.append(_contract(a, u, w.astype(cd), vec))
      return tuple(out)

    return _stream(seg, load, step, acc, unroll=unroll, ahead=ahead, first=tile0)

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
  if cfg.programs:   # (split_k is 1 then)
    kernel = functools.partial(_out_proj_persistent, eps=eps, cd=cd, block_k=bk, block_n=bn,
                               n_groups=n_groups, rows=rows, programs=cfg.programs,
                               eviction=cfg.eviction)
    grid = (cfg.programs,)
    out_spec, out_shape = _whole((r, d)), jax.ShapeDtypeStruct((r, d), f32)
  else:
    kernel = functools.partial(_out_proj_kernel, eps=eps, cd=cd, block_k=bk,
                               k_blocks=e // bk // split, n_groups=n_groups, rows=rows,
                               vec=vec, final=split == 1, unroll=cfg.unroll,
                               eviction=cfg.eviction, ahead=cfg.ahead)
    grid = (d // bn, split)
    out_spec, out_shape = _output(r, d, bn, split, f32)
  out = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[_whole((r, e)), _whole(ss.shape), _whole((e,)), _whole((d, e)),
                _whole((r, d))],
      out_specs=out_spec, out_shape=out_shape,
      **_compiler(interpret, cfg))(gated, ss, norm_weight.astype(f32), kernel_t,
                                   h.astype(f32))
  if split > 1:   # the partials' f32 sum, rounded once to cd, + h
    out = h.astype(f32) + round_to(jnp.sum(out, axis=0), cd)
  return out


def _out_proj_folded_kernel(yw_ref, ss_ref, w_ref, h_ref, w_next_ref, out_ref, u_ref, *, eps,
                            cd, block_k, n_groups, rows, vec, eviction, ahead):
  r, e = yw_ref.shape
  group = e // n_groups
  hpg = ss_ref.shape[1] // n_groups
  per_group = group // block_k
  bn = out_ref.shape[-1]
  cols = pl.ds(pl.program_id(0) * bn, bn)
  chunk = lambda k: _chunk(k, block_k)
  sel = _rows(min(r, rows), vec)             # vector path: the live rows only
  width = 1 if vec else r
  shape = (bn, block_k) if vec else (r, bn)
  totals = [jnp.zeros((width, bn), f32) for _ in sel]
  for gi in range(n_groups):                 # each group's blocks, then its 1/rms
    first = gi * per_group
    load = lambda k, first=first: _tile(w_ref, cols, chunk(first + k), eviction)
    tile0 = load(0) if ahead else None

    def step(k, acc, w, first=first):
      ks = chunk(first + k)
      return tuple(_contract(a, yw_ref[s, ks], w.astype(cd), vec) for a, s in zip(acc, sel))

    acc = _stream(per_group, load, step, tuple(jnp.zeros(shape, f32) for _ in sel),
                  unroll=False, ahead=ahead, first=tile0)
    for i, s in enumerate(sel):
      scale = _group_inv_rms(ss_ref, s, gi, hpg, width, group, eps)            # [1|R]
      totals[i] = totals[i] + scale[:, None] * _total(acc[i], vec)             # [1|R, bn]
  w_next = w_next_ref[cols][None, :]                                           # [1, bn]
  live = lax.broadcasted_iota(jnp.int32, (width, 1), 0) < rows                 # [1|R, 1]
  for total, s in zip(totals, sel):
    h = h_ref[s, cols]
    out = h + total.astype(cd).astype(f32)
    out = out if vec else jnp.where(live, out, h)
    out_ref[s, :] = out
    u_ref[s, :] = (out * w_next).astype(u_ref.dtype)
  if vec:   # the rows past `rows`: h itself
    for i in range(len(sel), r):
      h = h_ref[pl.ds(i, 1), cols]
      out_ref[pl.ds(i, 1), :] = h
      u_ref[pl.ds(i, 1), :] = (h * w_next).astype(u_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "n_groups", "rows", "config",
                                             "interpret"))
def out_proj_folded(yw: Array, ss: Array, kernel_t: Array, h: Array, next_norm_weight: Array,
                    *, eps: float, n_groups: int, rows: int | None = None,
                    config: Config | None = None, interpret: bool = False
                    ) -> tuple[Array, Array]:
  """out_proj with the gated norm folded as the fused step folds it (`fused_decode_step`):
  yw [R, E] cd = g * norm_weight rounded (`mixer_step`'s yw), ss [R, H * split] f32 its
  per-head sums of g^2 (rows >= `rows`, default R, never used), kernel_t [D, E] cd, h [R, D]
  f32, next_norm_weight [D] ->
    h_new = h + (sum over groups of 1/rms(g of the group) * (yw_group @ Wt_group^T))
            rounded to cd                                                       [R, D] f32
    u = h_new * next_norm_weight rounded to cd (the next `in_proj_reduce`'s input) [R, D]
  Each program reads its input once in cd (no per-element norm), where `out_proj` reads g
  and the norm weight in f32. The grid kernel, split_k 1 (the config's programs and split_k
  are dropped); 1/rms per group from ss as in `out_proj`."""
  r, e = yw.shape
  d = kernel_t.shape[0]
  rows = r if rows is None else rows
  cfg = effective("out_proj", r, d, e, n_groups,
                  (config or DEFAULTS[("out_proj", path_of(r))])._replace(programs=0,
                                                                          split_k=1))
  cd = kernel_t.dtype
  kernel = functools.partial(_out_proj_folded_kernel, eps=eps, cd=cd, block_k=cfg.block_k,
                             n_groups=n_groups, rows=rows, vec=path_of(r) == "vec",
                             eviction=cfg.eviction, ahead=cfg.ahead)
  spec = pl.BlockSpec((r, cfg.block_n), lambda j: (0, j))
  return tuple(pl.pallas_call(
      kernel, grid=(d // cfg.block_n,),
      in_specs=[_whole((r, e)), _whole(ss.shape), _whole((d, e)), _whole((r, d)),
                _whole((d,))],
      out_specs=[spec, spec],
      out_shape=[jax.ShapeDtypeStruct((r, d), f32), jax.ShapeDtypeStruct((r, d), cd)],
      **_compiler(interpret, cfg))(yw.astype(cd), ss, kernel_t, h.astype(f32),
                                   next_norm_weight.astype(f32)))


def in_proj_reduce(u: Array, h: Array, kernel_t: Array, ss_column: int) -> Array:
  """u [R, D] (cd: the RMS norm's input times its weight, h * w, rounded) @ kernel_t^T
  ([Np, D] cd) -> raw [R, Np] f32, with raw[:, ss_column] (one of kernel_t's zero padding
  rows) replaced by the sum of squares of h [R, D] f32, the norm's input: all in one XLA
  multiply-and-reduce over D (a reduction fusion, not a dot; the padding row's products
  are swapped for h^2 by a select). On an H100 XLA's reduction emitter streams in_proj's
  54 MB at 2.7 TB/s where `in_proj`'s kernels reach 2.4 (BENCHMARKS.md, "Decoding, session
  11"). The norm's 1/rms = rsqrt(raw[:, ss_column] / D + eps) is left to the caller
  (`mixer_step(in_norm=...)` applies it): the fused step's folding, not `in_proj`'s
  rounding of the normalised input."""
  if not kernel_t.shape[0] > ss_column >= 0:
    raise ValueError(f"in_proj_reduce: ss_column {ss_column} is not a row of kernel_t "
                     f"{kernel_t.shape}")
  products = kernel_t[None].astype(f32) * u[:, None, :].astype(f32)           # [R, Np, D]
  rows = lax.broadcasted_iota(jnp.int32, products.shape, 1)
  squares = jnp.square(h.astype(f32))[:, None, :]                              # [R, 1, D]
  return jnp.sum(jnp.where(rows == ss_column, squares, products), axis=-1)


__all__ = ["ROWS", "VEC_ROWS", "Config", "DEFAULTS", "padded_rows", "path_of", "effective",
           "in_proj", "out_proj", "out_proj_folded", "in_proj_reduce"]
