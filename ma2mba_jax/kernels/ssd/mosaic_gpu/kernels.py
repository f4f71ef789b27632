"""The chunked SSD's six kernels in Pallas for the Mosaic GPU lowering (Hopper, sm_90).

Same names, arguments, results and layouts at the boundary as pallas/kernels.py (see its
docstring and ../chunked.py for the algorithm); written with `plgpu.kernel` (one
warpgroup per program, a grid of programs), TMA copies into swizzled shared memory and
warpgroup matmuls (`plgpu.wgmma`, f32 accumulators), and `plgpu.emit_pipeline` where a
program walks a sequence (chunks, heads, row tiles): the copies of the next steps run
while the current one computes.

Matmul operands are bf16 (f32 inputs are rounded to bf16 on the way in; accumulation is
always f32). Tiles are 64 rows (a warpgroup matmul's M), so the chunk length Q, the head
dim P and the state size N must be multiples of 64 (`check_shapes`).

Layout inside a program: a [64, K] register tile is in the WGMMA layout; its per-row
vectors (cs_l, w_l: one value per row) are `Layout.WGMMA.reduce(1)` and broadcast along
dim 1, its per-column vectors (cs_s, dt_s, D) are `Layout.WGMMA.reduce(0)`.

Letters: l / s target / source step inside a chunk, i / j their 64-row tile, g group,
hg heads per group (head h reads group h // hg), t0 the chunk's first step.

`interpret=True` runs a kernel in Pallas' Mosaic GPU interpreter (`plgpu.InterpretGPUParams`,
any platform; used by the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ma2mba_jax.kernels.ssd.common import largest_divisor

F32 = jnp.float32
BF16 = jnp.bfloat16
TILE = 64                       # rows of a register tile (one warpgroup matmul's M)
_LANES = 128                    # state_pass: state elements per row of a block
_OUT_SLOTS = 2                  # state_pass: carries in flight to global memory
_ROW = plgpu.Layout.WGMMA.reduce(1)    # one value per row of a WGMMA tile
_COL = plgpu.Layout.WGMMA.reduce(0)    # one value per column


def check_shapes(chunk_len: int, head_dim: int, d_state: int, backend: str = "mosaic_gpu"):
  for name, v in (("chunk_len", chunk_len), ("head_dim P", head_dim), ("d_state N", d_state)):
    if v % TILE:
      raise ValueError(f"ssd {backend}: {name}={v} must be a multiple of {TILE} for the Mosaic "
                       f"GPU kernels (use impl='triton', 'pallas' or 'xla' for other shapes)")


def _tf(dtype, minor: int):
  """Tiling + swizzle transforms of a [rows, minor] shared-memory tile of `dtype`."""
  bits = minor * jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(bits)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=_tf(dtype, shape[-1]))


def _spec(block, index_map, dtype=None):
  """A pipeline block: 2D tiles get the swizzle transforms (matmul operands), 1D don't."""
  dims = [d for d in block if d is not None]
  if dtype is not None and len(dims) == 2:
    return plgpu.BlockSpec(block, index_map, transforms=_tf(dtype, dims[-1]))
  return plgpu.BlockSpec(block, index_map)


def _params():
  return plgpu.CompilerParams(approx_math=True)


def _interp(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else False


def _mm(a):
  """A matmul operand in bf16."""
  return a if a.dtype == BF16 else a.astype(BF16)


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)


def _wgmma(acc, a, b, interpret: bool = False):
  """acc + a @ b (acc a WGMMA-layout f32 array; a registers or SMEM, b SMEM).

  The Mosaic GPU interpreter (jax 0.11.2) takes matmul operands from shared memory only, so
  with `interpret` a register operand is staged through a scratch tile first."""
  shape = (a.shape[0], b.shape[1])
  if interpret and isinstance(a, jax.Array):
    def staged(a_s):
      a_s[...] = a
      plgpu.commit_smem()
      return _wgmma(acc, a_s, b)
    return pl.run_scoped(staged, _smem(a.shape, a.dtype))

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return acc + pl.run_scoped(body, plgpu.ACC(shape, F32))


def _causal_decay(cs_l, cs_s, l0, s0, *, transposed: bool = False):
  """exp(cs_l - cs_s) where l >= s, else 0: [64, 64] with l / s on rows / columns, or on
  columns / rows if `transposed` (then cs_l is the column vector). l0, s0: tile offsets."""
  if transposed:
    shape = (cs_s.shape[0], cs_l.shape[0])
    l_dim, s_dim = 1, 0
  else:
    shape = (cs_l.shape[0], cs_s.shape[0])
    l_dim, s_dim = 0, 1
  l_idx = plgpu.broadcasted_iota(jnp.int32, shape, l_dim, layout=plgpu.Layout.WGMMA)
  s_idx = plgpu.broadcasted_iota(jnp.int32, shape, s_dim, layout=plgpu.Layout.WGMMA)
  diff = (lax.broadcast_in_dim(cs_l, shape, [l_dim])
          - lax.broadcast_in_dim(cs_s, shape, [s_dim]))
  return jnp.exp(jnp.where(l_idx + l0 >= s_idx + s0, diff, -jnp.inf))


def _row(v, shape):
  return lax.broadcast_in_dim(v, shape, [0])


def _col(v, shape):
  return lax.broadcast_in_dim(v, shape, [1])


# ------------------------------------------------------------------------------------
# chunk_state


def chunk_state(u, v, w, *, chunk_len: int, interpret: bool = False, **_):
  """inc[b, c, h] = sum_s w_s u_s^T v_s: u [B, T, H, P], v [B, T, G, N], w [B, H, T] f32.
  Returns [B, C, H, P, N] f32. One program per (head, chunk, batch) walks the chunk's row
  tiles (pipelined), accumulating u_tile^T (w v)_tile in registers."""
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  q = chunk_len
  n_chunks, hg, nt = seqlen // q, n_heads // n_groups, q // TILE
  u, v = _mm(u), _mm(v)

  def body(u_ref, v_ref, w_ref, inc_ref, vw_s, out_s):
    h, k, b = (lax.axis_index(a) for a in ("h", "k", "b"))
    g = lax.div(h, hg)
    t0 = k * q

    def step(_, u_s, v_s, w_s, acc):
      w = plgpu.load(w_s, layout=_ROW)
      vw = plgpu.load(v_s, layout=plgpu.Layout.WGMMA).astype(F32) * _row(w, (TILE, d_state))
      vw_s[...] = vw.astype(BF16)
      plgpu.commit_smem()
      return _wgmma(acc, u_s.transpose((1, 0)), vw_s)

    acc = plgpu.emit_pipeline(
        step, grid=(nt,), max_concurrent_steps=min(2, nt),
        in_specs=[_spec((TILE, None, head_dim), lambda i: (i, h, 0), BF16),
                  _spec((TILE, None, d_state), lambda i: (i, g, 0), BF16),
                  _spec((None, TILE), lambda i: (h, i))],
        init_carry=_zeros((head_dim, d_state)),
    )(u_ref.at[b, pl.ds(t0, q)], v_ref.at[b, pl.ds(t0, q)], w_ref.at[b, :, pl.ds(t0, q)])
    out_s[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, inc_ref.at[b, k, h])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), F32),
      scratch_types=[_smem((TILE, d_state), BF16), _smem((head_dim, d_state), F32)],
      grid=(n_heads, n_chunks, batch), grid_names=("h", "k", "b"),
      compiler_params=_params(), interpret=_interp(interpret), kernel_name="ssd_mgpu_chunk_state",
  )(u, v, w)


# ------------------------------------------------------------------------------------
# state_pass


def state_pass(inc, decay, init, other=None, *, reverse: bool, out_dtype,
               block_s: int = 1024, interpret: bool = False, **_):
  """carry_{c+1} = decay_c * carry_c + inc_c over the chunks (in reverse if `reverse`).

  inc [B, C, H, P, N] f32, decay [B, H, C] f32, init [B, H, P, N] f32, other optional
  [B, C, H, P, N]. One program per (block of `block_s` state elements, head, batch) walks
  the chunks with the carry in registers; the chunk blocks stream through a pipeline.
  Returns carries [B, C, H, P, N] (out_dtype; the carry before chunk c is added, in scan
  order), final [B, H, P, N] f32 and with `other` dots [B, H, P*N/block_s, C] f32.
  """
  batch, n_chunks, n_heads, head_dim, d_state = inc.shape
  size = head_dim * d_state
  if size % _LANES:
    raise ValueError(f"ssd mosaic_gpu: state_pass needs P*N={size} to be a multiple of {_LANES}")
  # A block is a whole number of 128-element rows, at most 256 rows (one TMA copy).
  bs = _LANES * largest_divisor(size // _LANES, min(256, max(1, block_s // _LANES)))
  n_sb = size // bs
  br = bs // _LANES                 # rows of 128 state elements per block
  with_other = other is not None
  # Per-chunk scalars (decays, dots) as [c_rows, c_cols] tiles: a TMA copy moves a
  # multiple of 16 bytes and at most 256 values along each dim (C = 512 at 128K tokens).
  c_cols = -(-n_chunks // 16) * 16 if n_chunks <= _LANES else _LANES
  c_rows = -(-n_chunks // c_cols)
  if c_rows > 256:
    raise ValueError(f"ssd mosaic_gpu: state_pass takes at most {256 * _LANES} chunks, got "
                     f"{n_chunks}")
  c_pad = c_rows * c_cols
  decay_p = jnp.pad(decay.astype(F32), ((0, 0), (0, 0), (0, c_pad - n_chunks)))
  decay_p = decay_p.reshape(batch, n_heads, c_rows, c_cols)
  at = lambda c: (lax.div(c, c_cols), lax.rem(c, c_cols))
  # [..., P, N] -> [..., P*N/128, 128]: a TMA copy moves at most 256 along each dim.
  rows = lambda a: a.reshape(a.shape[:-2] + (size // _LANES, _LANES))
  chunk_of = (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)

  def body(inc_ref, decay_ref, init_ref, *rest):
    if with_other:
      other_ref, carries_ref, final_ref, dots_ref, dec_s, vec_s, out_s, dots_s, bar = rest
    else:
      carries_ref, final_ref, dec_s, vec_s, out_s, bar = rest
      other_ref = dots_ref = dots_s = None
    sb, h, b = (lax.axis_index(a) for a in ("s", "h", "b"))
    block = pl.ds(sb * br, br)
    plgpu.copy_gmem_to_smem(decay_ref.at[b, h], dec_s, bar)
    plgpu.copy_gmem_to_smem(init_ref.at[b, h, block], vec_s, bar)
    plgpu.barrier_wait(bar)
    carry = vec_s[...]

    def step(idx, inc_s, *refs):
      if with_other:
        other_s, carry = refs
      else:
        (carry,) = refs
      c = chunk_of(idx[0])
      # The carry goes out through a ring of _OUT_SLOTS tiles: wait until the copy that
      # last read this step's slot is done, fill it, start its copy.
      slot = lax.rem(idx[0], _OUT_SLOTS)
      plgpu.wait_smem_to_gmem(_OUT_SLOTS - 1, wait_read_only=True)
      out_s[slot] = carry.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_s.at[slot], carries_ref.at[b, c, h, block])
      if with_other:
        dots_s[at(c)] = jnp.sum(carry * other_s[...].astype(F32))
      return dec_s[at(c)] * carry + inc_s[...]

    chunk_spec = _spec((None, br, _LANES), lambda i: (chunk_of(i), 0, 0))
    in_specs = [chunk_spec] + ([chunk_spec] if with_other else [])
    args = [inc_ref.at[b, :, h, block]]
    if with_other:
      args.append(other_ref.at[b, :, h, block])
    carry = plgpu.emit_pipeline(
        step, grid=(n_chunks,), max_concurrent_steps=min(4, n_chunks),
        in_specs=in_specs, init_carry=carry,
    )(*args)
    vec_s[...] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vec_s, final_ref.at[b, h, block])
    if with_other:
      plgpu.copy_smem_to_gmem(dots_s, dots_ref.at[b, h, sb])
    plgpu.wait_smem_to_gmem(0)

  n_rows = size // _LANES
  out_type = [jax.ShapeDtypeStruct((batch, n_chunks, n_heads, n_rows, _LANES), out_dtype),
              jax.ShapeDtypeStruct((batch, n_heads, n_rows, _LANES), F32)]
  scratch = [plgpu.SMEM((c_rows, c_cols), F32), plgpu.SMEM((br, _LANES), F32),
             plgpu.SMEM((_OUT_SLOTS, br, _LANES), out_dtype)]
  args = [rows(inc), decay_p, rows(init).astype(F32)]
  if with_other:
    out_type.append(jax.ShapeDtypeStruct((batch, n_heads, n_sb, c_rows, c_cols), F32))
    scratch.append(plgpu.SMEM((c_rows, c_cols), F32))
    args.append(rows(other))
  scratch.append(plgpu.Barrier(num_arrivals=2))
  outs = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(n_sb, n_heads, batch), grid_names=("s", "h", "b"),
      compiler_params=_params(), interpret=_interp(interpret),
      kernel_name="ssd_mgpu_state_pass_rev" if reverse else "ssd_mgpu_state_pass",
  )(*args)
  carries = outs[0].reshape(inc.shape)
  final = outs[1].reshape(init.shape)
  dots = (outs[2].reshape(batch, n_heads, n_sb, c_pad)[..., :n_chunks] if with_other
          else None)
  return carries, final, dots


# ------------------------------------------------------------------------------------
# chunk_scan_fwd


def chunk_scan_fwd(x, dt, cs, cb, c, states, d, *, chunk_len: int, num_stages: int = 2,
                   interpret: bool = False, **_):
  """y [B, T, H, P] in x.dtype from x, dt/cs [B, H, T], cb [B, C, G, Q, Q], C, the states
  entering each chunk [B, C, H, P, N] and D [H, P] (or None).

  One program per (row tile i, head, chunk, batch): y_i = exp(cs_i) C_i state^T (one
  matmul) + sum over source tiles j <= i of (CB_ij * decay * dt_j) x_j (a loop of
  matmuls over the causal tiles only) + D x_i.
  num_stages >= 2: only the causal source tiles are copied, each with its own barrier, so
  the loop's first matmuls overlap the later tiles' copies; 1: every tile is copied and
  waited for before any compute (version 1 of this kernel, kept to compare).
  """
  overlap = num_stages >= 2
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = c.shape[2:]
  q = chunk_len
  n_chunks, hg, nt = seqlen // q, n_heads // n_groups, q // TILE
  out_dtype = x.dtype
  x, c, cb, states = _mm(x), _mm(c), _mm(cb), _mm(states)
  with_d = d is not None

  def body(x_ref, dt_ref, cs_ref, cb_ref, c_ref, st_ref, *rest):
    if with_d:
      d_ref, y_ref, x_s, c_s, cb_s, st_s, dt_s, cs_s, csl_s, d_s, y_s, bar, tile_bar = rest
    else:
      y_ref, x_s, c_s, cb_s, st_s, dt_s, cs_s, csl_s, y_s, bar, tile_bar = rest
    i, h, k, b = (lax.axis_index(a) for a in ("i", "h", "k", "b"))
    g = lax.div(h, hg)
    t0 = k * q
    l0 = i * TILE
    for j in range(nt):
      def copy_tile(j=j):
        rows = pl.ds(t0 + j * TILE, TILE)
        tb = tile_bar.at[j] if overlap else bar
        plgpu.copy_gmem_to_smem(x_ref.at[b, rows, h], x_s.at[j], tb)
        plgpu.copy_gmem_to_smem(cb_ref.at[b, k, g, pl.ds(l0, TILE), pl.ds(j * TILE, TILE)],
                                cb_s.at[j], tb)
        plgpu.copy_gmem_to_smem(dt_ref.at[b, h, rows], dt_s.at[j], tb)
        plgpu.copy_gmem_to_smem(cs_ref.at[b, h, rows], cs_s.at[j], tb)
      if overlap:
        pl.when(j <= i)(copy_tile)
      else:
        copy_tile()
    plgpu.copy_gmem_to_smem(c_ref.at[b, pl.ds(t0 + l0, TILE), g], c_s, bar)
    plgpu.copy_gmem_to_smem(st_ref.at[b, k, h], st_s, bar)
    plgpu.copy_gmem_to_smem(cs_ref.at[b, h, pl.ds(t0 + l0, TILE)], csl_s, bar)
    if with_d:
      plgpu.copy_gmem_to_smem(d_ref.at[h], d_s, bar)
    plgpu.barrier_wait(bar)

    shape = (TILE, head_dim)
    cs_l = plgpu.load(csl_s, layout=_ROW)
    # The state carried in from earlier chunks, decayed to each step.
    acc = _wgmma(_zeros(shape), c_s, st_s.transpose((1, 0)))
    acc = acc * _row(jnp.exp(cs_l), shape)

    def tile(j, acc):
      if overlap:
        plgpu.barrier_wait(tile_bar.at[j])
      cs_j = plgpu.load(cs_s.at[j], layout=_COL)
      dt_j = plgpu.load(dt_s.at[j], layout=_COL)
      cb_ij = plgpu.load(cb_s.at[j], layout=plgpu.Layout.WGMMA).astype(F32)
      scores = cb_ij * _causal_decay(cs_l, cs_j, l0, j * TILE) * _col(dt_j, (TILE, TILE))
      return _wgmma(acc, scores.astype(BF16), x_s.at[j], interpret)

    acc = lax.fori_loop(0, i + 1, tile, acc)
    if with_d:
      x_i = plgpu.load(x_s.at[i], layout=plgpu.Layout.WGMMA).astype(F32)
      acc = acc + _col(plgpu.load(d_s, layout=_COL), shape) * x_i
    y_s[...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_ref.at[b, pl.ds(t0 + l0, TILE), h])
    plgpu.wait_smem_to_gmem(0)

  n_copies = (0 if overlap else 4 * nt) + 3 + int(with_d)
  scratch = [_smem((nt, TILE, head_dim), BF16), _smem((TILE, d_state), BF16),
             _smem((nt, TILE, TILE), BF16), _smem((head_dim, d_state), BF16),
             plgpu.SMEM((nt, TILE), F32), plgpu.SMEM((nt, TILE), F32),
             plgpu.SMEM((TILE,), F32)]
  args = [x, dt, cs, cb, c, states]
  if with_d:
    scratch.append(plgpu.SMEM((head_dim,), F32))
    args.append(d.astype(F32))
  scratch += [_smem((TILE, head_dim), out_dtype), plgpu.Barrier(num_arrivals=n_copies),
              plgpu.Barrier(num_arrivals=4, num_barriers=nt)]
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((batch, seqlen, n_heads, head_dim), out_dtype),
      scratch_types=scratch, grid=(nt, n_heads, n_chunks, batch),
      grid_names=("i", "h", "k", "b"), compiler_params=_params(),
      interpret=_interp(interpret), kernel_name="ssd_mgpu_chunk_scan_fwd",
  )(*args)


# ------------------------------------------------------------------------------------
# chunk_scan_bwd_dx


def chunk_scan_bwd_dx(dy, x, dt, cs, cb, b, dstates, d, *, chunk_len: int,
                      num_stages: int = 2, interpret: bool = False, **_):
  """dx [B, T, H, P] (x.dtype) and the direct d(dt) [B, H, T] f32 (the part not through cs).

  dstates [B, C, H, P, N]: gradient of the state leaving each chunk. One program per
  (source tile j, head, chunk, batch): acc_j = exp(cs_last - cs_j) B_j dstate^T + sum over
  target tiles i >= j of (CB_ij * decay)^T dy_i; d(dt)_j = rowsum(acc_j * x_j),
  dx_j = dt_j acc_j + D dy_j. CB is transposed by XLA first (CB^T tiles load as rows).
  num_stages as in chunk_scan_fwd (>= 2: only tiles i >= j are copied, each waited for
  in the loop).
  """
  overlap = num_stages >= 2
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = b.shape[2:]
  q = chunk_len
  n_chunks, hg, nt = seqlen // q, n_heads // n_groups, q // TILE
  out_dtype = x.dtype
  # exp(cs_last - cs_s) per step (f32) and CB^T [B, C, G, Q(s), Q(l)].
  cs_c = cs.reshape(batch, n_heads, n_chunks, q)
  to_end = jnp.exp(cs_c[..., -1:] - cs_c).reshape(cs.shape)
  cbt = _mm(jnp.swapaxes(cb, -1, -2))
  dy, x, b, dstates = _mm(dy), _mm(x), _mm(b), _mm(dstates)
  with_d = d is not None

  def body(dy_ref, x_ref, dt_ref, cs_ref, te_ref, cbt_ref, b_ref, ds_ref, *rest):
    if with_d:
      d_ref, dx_ref, ddt_ref, dy_s, cbt_s, cs_s, x_s, b_s, st_s, dt_s, te_s, csj_s, d_s, \
          dx_s, ddt_s, bar, tile_bar = rest
    else:
      dx_ref, ddt_ref, dy_s, cbt_s, cs_s, x_s, b_s, st_s, dt_s, te_s, csj_s, dx_s, ddt_s, \
          bar, tile_bar = rest
    j, h, k, bb = (lax.axis_index(a) for a in ("j", "h", "k", "b"))
    g = lax.div(h, hg)
    t0 = k * q
    s0 = j * TILE
    rows_s = pl.ds(t0 + s0, TILE)
    for i in range(nt):
      def copy_tile(i=i):
        rows = pl.ds(t0 + i * TILE, TILE)
        tb = tile_bar.at[i] if overlap else bar
        plgpu.copy_gmem_to_smem(dy_ref.at[bb, rows, h], dy_s.at[i], tb)
        plgpu.copy_gmem_to_smem(cbt_ref.at[bb, k, g, pl.ds(s0, TILE), pl.ds(i * TILE, TILE)],
                                cbt_s.at[i], tb)
        plgpu.copy_gmem_to_smem(cs_ref.at[bb, h, rows], cs_s.at[i], tb)
      if overlap:
        pl.when(i >= j)(copy_tile)
      else:
        copy_tile()
    plgpu.copy_gmem_to_smem(cs_ref.at[bb, h, rows_s], csj_s, bar)
    plgpu.copy_gmem_to_smem(x_ref.at[bb, rows_s, h], x_s, bar)
    plgpu.copy_gmem_to_smem(b_ref.at[bb, rows_s, g], b_s, bar)
    plgpu.copy_gmem_to_smem(ds_ref.at[bb, k, h], st_s, bar)
    plgpu.copy_gmem_to_smem(dt_ref.at[bb, h, rows_s], dt_s, bar)
    plgpu.copy_gmem_to_smem(te_ref.at[bb, h, rows_s], te_s, bar)
    if with_d:
      plgpu.copy_gmem_to_smem(d_ref.at[h], d_s, bar)
    plgpu.barrier_wait(bar)

    shape = (TILE, head_dim)
    cs_j = plgpu.load(csj_s, layout=_ROW)
    # Through the state leaving the chunk.
    acc = _wgmma(_zeros(shape), b_s, st_s.transpose((1, 0)))
    acc = acc * _row(plgpu.load(te_s, layout=_ROW), shape)

    def tile(i, acc):
      if overlap:
        plgpu.barrier_wait(tile_bar.at[i])
      cs_i = plgpu.load(cs_s.at[i], layout=_COL)
      cbt_ji = plgpu.load(cbt_s.at[i], layout=plgpu.Layout.WGMMA).astype(F32)
      # decay^T[s, l] = exp(cs_l - cs_s) for l >= s, s on rows.
      dec_t = _causal_decay(cs_i, cs_j, i * TILE, s0, transposed=True)
      return _wgmma(acc, (cbt_ji * dec_t).astype(BF16), dy_s.at[i], interpret)

    acc = lax.fori_loop(j, nt, tile, acc)
    x_j = plgpu.load(x_s, layout=plgpu.Layout.WGMMA).astype(F32)
    ddt_s[...] = jnp.sum(acc * x_j, axis=1)
    dx = acc * _row(plgpu.load(dt_s, layout=_ROW), shape)
    if with_d:
      dy_j = plgpu.load(dy_s.at[j], layout=plgpu.Layout.WGMMA).astype(F32)
      dx = dx + _col(plgpu.load(d_s, layout=_COL), shape) * dy_j
    dx_s[...] = dx.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dx_s, dx_ref.at[bb, rows_s, h])
    plgpu.copy_smem_to_gmem(ddt_s, ddt_ref.at[bb, h, rows_s])
    plgpu.wait_smem_to_gmem(0)

  n_copies = (0 if overlap else 3 * nt) + 6 + int(with_d)
  scratch = [_smem((nt, TILE, head_dim), BF16), _smem((nt, TILE, TILE), BF16),
             plgpu.SMEM((nt, TILE), F32), _smem((TILE, head_dim), BF16),
             _smem((TILE, d_state), BF16), _smem((head_dim, d_state), BF16),
             plgpu.SMEM((TILE,), F32), plgpu.SMEM((TILE,), F32), plgpu.SMEM((TILE,), F32)]
  args = [dy, x, dt, cs, to_end, cbt, b, dstates]
  if with_d:
    scratch.append(plgpu.SMEM((head_dim,), F32))
    args.append(d.astype(F32))
  scratch += [_smem((TILE, head_dim), out_dtype), plgpu.SMEM((TILE,), F32),
              plgpu.Barrier(num_arrivals=n_copies),
              plgpu.Barrier(num_arrivals=3, num_barriers=nt)]
  return plgpu.kernel(
      body, out_type=[jax.ShapeDtypeStruct((batch, seqlen, n_heads, head_dim), out_dtype),
                      jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)],
      scratch_types=scratch, grid=(nt, n_heads, n_chunks, batch),
      grid_names=("j", "h", "k", "b"), compiler_params=_params(),
      interpret=_interp(interpret), kernel_name="ssd_mgpu_chunk_scan_bwd_dx",
  )(*args)


# ------------------------------------------------------------------------------------
# chunk_dcb


def chunk_dcb(dy, x, dt, cs, cb, *, chunk_len: int, n_groups: int, heads: int = 20,
              interpret: bool = False, **_):
  """Gradient of CB summed over the heads of each group, and the per-head sums of
  E = dCB_h * CB over source steps (erow) and over target steps (ecol).

  One program per (source tile j, target tile i, block of `heads` heads of a group, chunk,
  batch) walks its heads (pipelined): dm = dy_i x_j^T, grad = dm * decay * dt_j summed in
  registers. Tiles above the diagonal (i < j) write zeros.
  Returns dcb [B, C, G, Q, Q] f32, erow and ecol [B, H, Q/64, T] f32 (partial sums over the
  other tile index; the caller sums axis 2).
  """
  batch, seqlen, n_heads, head_dim = x.shape
  q = chunk_len
  n_chunks, nt = seqlen // q, q // TILE
  hg = n_heads // n_groups
  hp = largest_divisor(hg, heads)
  n_split = hg // hp
  dy, x, cb = _mm(dy), _mm(x), _mm(cb)

  def body(dy_ref, x_ref, dt_ref, cs_ref, cb_ref, dcb_ref, erow_ref, ecol_ref,
           cb_s, dcb_s, er_s, ec_s, bar):
    j, i, m, k, b = (lax.axis_index(a) for a in ("j", "i", "m", "k", "b"))
    g = lax.div(m, n_split)
    h0 = m * hp
    t0 = k * q
    l0, s0 = i * TILE, j * TILE
    tile = (TILE, TILE)

    @pl.when(i >= j)
    def _():
      plgpu.copy_gmem_to_smem(cb_ref.at[b, k, g, pl.ds(l0, TILE), pl.ds(s0, TILE)], cb_s,
                              bar)
      plgpu.barrier_wait(bar)
      cb_ij = plgpu.load(cb_s, layout=plgpu.Layout.WGMMA).astype(F32)

      def head(idx, dy_s, x_s, dt_s, csl_s, css_s, acc):
        dm = _wgmma(_zeros(tile), dy_s, x_s.transpose((1, 0)))
        dec = _causal_decay(plgpu.load(csl_s, layout=_ROW), plgpu.load(css_s, layout=_COL),
                            l0, s0)
        grad = dm * dec * _col(plgpu.load(dt_s, layout=_COL), tile)
        e = grad * cb_ij
        er_s[idx[0]] = jnp.sum(e, axis=1)
        ec_s[idx[0]] = jnp.sum(e, axis=0)
        return acc + grad

      vec = _spec((None, TILE), lambda hh: (h0 + hh, 0))
      acc = plgpu.emit_pipeline(
          head, grid=(hp,), max_concurrent_steps=min(2, hp),
          in_specs=[_spec((TILE, None, head_dim), lambda hh: (0, h0 + hh, 0), BF16),
                    _spec((TILE, None, head_dim), lambda hh: (0, h0 + hh, 0), BF16),
                    vec, vec, vec],
          init_carry=_zeros(tile),
      )(dy_ref.at[b, pl.ds(t0 + l0, TILE)], x_ref.at[b, pl.ds(t0 + s0, TILE)],
        dt_ref.at[b, :, pl.ds(t0 + s0, TILE)], cs_ref.at[b, :, pl.ds(t0 + l0, TILE)],
        cs_ref.at[b, :, pl.ds(t0 + s0, TILE)])
      dcb_s[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dcb_s, dcb_ref.at[b, m % n_split, k, g, pl.ds(l0, TILE),
                                                pl.ds(s0, TILE)])
      plgpu.copy_smem_to_gmem(er_s, erow_ref.at[b, pl.ds(h0, hp), j, pl.ds(t0 + l0, TILE)])
      plgpu.copy_smem_to_gmem(ec_s, ecol_ref.at[b, pl.ds(h0, hp), i, pl.ds(t0 + s0, TILE)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(i < j)
    def _():
      # Above the diagonal: dCB is zero and nothing is added to d(cs).
      dcb_s[...] = _zeros(tile)
      zero_row = plgpu.layout_cast(jnp.zeros((TILE,), F32), _ROW)
      for hh in range(hp):
        er_s[hh] = zero_row
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dcb_s, dcb_ref.at[b, m % n_split, k, g, pl.ds(l0, TILE),
                                                pl.ds(s0, TILE)])
      plgpu.copy_smem_to_gmem(er_s, erow_ref.at[b, pl.ds(h0, hp), j, pl.ds(t0 + l0, TILE)])
      plgpu.copy_smem_to_gmem(er_s, ecol_ref.at[b, pl.ds(h0, hp), i, pl.ds(t0 + s0, TILE)])
      plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct((batch, n_split, n_chunks, n_groups, q, q), F32),
              jax.ShapeDtypeStruct((batch, n_heads, nt, seqlen), F32),
              jax.ShapeDtypeStruct((batch, n_heads, nt, seqlen), F32)]
  dcb, erow, ecol = plgpu.kernel(
      body, out_type=out_type,
      scratch_types=[_smem((TILE, TILE), BF16), _smem((TILE, TILE), F32),
                     plgpu.SMEM((hp, TILE), F32), plgpu.SMEM((hp, TILE), F32),
                     plgpu.Barrier(num_arrivals=1)],
      grid=(nt, nt, n_heads // hp, n_chunks, batch), grid_names=("j", "i", "m", "k", "b"),
      compiler_params=_params(), interpret=_interp(interpret), kernel_name="ssd_mgpu_chunk_dcb",
  )(dy, x, dt, cs, cb)
  return jnp.sum(dcb, axis=1), erow, ecol


# ------------------------------------------------------------------------------------
# head_contract


def head_contract(u, w, s, v, *, chunk_len: int, heads: int = 8, interpret: bool = False,
                  **_):
  """acc[t, g] = sum over heads h of group g of (w_h[t] u_h[t]) @ S_h[chunk of t], and the
  per-head epilogue r_h[t] = v[t, g] . ((w_h[t] u_h[t]) @ S_h).

  u [B, T, H, P], w [B, H, T] f32, s [B, C, H, P, N], v [B, T, G, N]. One program per (row
  tile, block of `heads` heads of a group, chunk, batch) walks its heads (pipelined).
  Returns acc [B, T, G, N] f32 and r [B, H, T] f32.
  """
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  q = chunk_len
  n_chunks, nt = seqlen // q, q // TILE
  hg = n_heads // n_groups
  hp = largest_divisor(hg, heads)
  n_split = hg // hp
  u, s = _mm(u), _mm(s)

  def body(u_ref, w_ref, s_ref, v_ref, acc_ref, r_ref, v_s, acc_s, r_s, bar):
    r, m, k, b = (lax.axis_index(a) for a in ("r", "m", "k", "b"))
    g = lax.div(m, n_split)
    h0 = m * hp
    rows = pl.ds(k * q + r * TILE, TILE)
    shape = (TILE, d_state)
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, g], v_s, bar)
    plgpu.barrier_wait(bar)
    v_r = plgpu.load(v_s, layout=plgpu.Layout.WGMMA).astype(F32)

    def head(idx, u_s, w_s, s_s, acc):
      uw = (plgpu.load(u_s, layout=plgpu.Layout.WGMMA).astype(F32)
            * _row(plgpu.load(w_s, layout=_ROW), (TILE, head_dim)))
      t = _wgmma(_zeros(shape), uw.astype(BF16), s_s, interpret)
      r_s[idx[0]] = jnp.sum(t * v_r, axis=1)
      return acc + t

    acc = plgpu.emit_pipeline(
        head, grid=(hp,), max_concurrent_steps=min(2, hp),
        in_specs=[_spec((TILE, None, head_dim), lambda hh: (0, h0 + hh, 0), BF16),
                  _spec((None, TILE), lambda hh: (h0 + hh, 0)),
                  _spec((None, head_dim, d_state), lambda hh: (h0 + hh, 0, 0), BF16)],
        init_carry=_zeros(shape),
    )(u_ref.at[b, rows], w_ref.at[b, :, rows], s_ref.at[b, k])
    acc_s[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_s, acc_ref.at[b, m % n_split, rows, g])
    plgpu.copy_smem_to_gmem(r_s, r_ref.at[b, pl.ds(h0, hp), rows])
    plgpu.wait_smem_to_gmem(0)

  acc, r = plgpu.kernel(
      body, out_type=[jax.ShapeDtypeStruct((batch, n_split, seqlen, n_groups, d_state), F32),
                      jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)],
      scratch_types=[_smem((TILE, d_state), v.dtype), _smem((TILE, d_state), F32),
                     plgpu.SMEM((hp, TILE), F32), plgpu.Barrier(num_arrivals=1)],
      grid=(nt, n_heads // hp, n_chunks, batch), grid_names=("r", "m", "k", "b"),
      compiler_params=_params(), interpret=_interp(interpret), kernel_name="ssd_mgpu_head_contract",
  )(u, w, s, v)
  return jnp.sum(acc, axis=1), r
