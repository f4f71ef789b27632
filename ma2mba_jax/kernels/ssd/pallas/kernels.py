"""The Pallas kernels of the chunked SSD (lowered through Triton on GPU).

Each wrapper takes its block sizes, `num_warps`, `num_stages` and `interpret` (run the
kernel with the Pallas interpreter, e.g. on CPU). Shapes are already padded so that the
chunk length Q divides T. Layouts: x, dy [B, T, H, P]; B, C [B, T, G, N]; per-step
scalars (dt, cs = within-chunk cumulative sum of dt*A, weights) [B, H, T] in f32; chunk
states [B, C, H, P, N] and CB = C.B^T per chunk [B, C, G, Q, Q] in f32 or in x's dtype
(their matmuls then run in that dtype; all accumulation is f32).

Letters: l / s target / source step inside a chunk, i / j their block index, g group,
hg heads per group (head h reads group h // hg).

Kernels (../chunked.py puts them together and derives the gradients):
  chunk_state       inc_c = sum_s w_s u_s^T v_s for every chunk, in parallel.
  state_pass        carry_{c+1} = decay_c * carry_c + inc_c, sequential over chunks,
                    parallel over (B, H, state elements); the forward states and, run in
                    reverse, the state gradients.
  (state_scan       the two above fused in one sequential kernel; option state_impl.)
  chunk_scan_fwd    y = (CB * decay * dt) x within the chunk + exp(cs) C state^T + D x.
  chunk_scan_bwd_dx dx and the direct part of d(dt), the transpose of chunk_scan_fwd.
  chunk_dcb         sum over the heads of a group of (dy x^T * decay * dt) (the gradient
                    of CB) and the per-head row / column sums that give d(cs).
  head_contract     sum over the heads of a group of (u * w) @ S_h, with a per-head
                    epilogue; gives dC from the states and dB from the state gradients.
The last two take a block of `heads` heads of a group per program and add the blocks'
partial sums afterwards (more programs, shorter serial loops).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ma2mba_jax.kernels.ssd.common import check_block, dims, largest_divisor

F32 = jnp.float32
_CONTRACT_ROWS = (((0,), (0,)), ((), ()))   # a^T b
_CONTRACT_COLS = (((1,), (1,)), ((), ()))   # a b^T


def _params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _causal_decay(cs_l, cs_s, l0, s0):
  """exp(cs_l - cs_s) where l >= s, else 0: [bl, bs]. The masked exponent is <= 0."""
  l_idx = l0 + lax.broadcasted_iota(jnp.int32, (cs_l.shape[0], cs_s.shape[0]), 0)
  s_idx = s0 + lax.broadcasted_iota(jnp.int32, (cs_l.shape[0], cs_s.shape[0]), 1)
  diff = jnp.where(l_idx >= s_idx, cs_l[:, None] - cs_s[None, :], -jnp.inf)
  return jnp.exp(diff)


# ------------------------------------------------------------------------------------
# chunk_state


def _chunk_state_kernel(u_ref, v_ref, w_ref, inc_ref, *, block_k):
  def body(k, acc):
    rows = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    u = u_ref[rows, :]                                                    # [bk, bp]
    uw = (u.astype(F32) * w_ref[rows][:, None]).astype(u.dtype)
    return acc + lax.dot_general(uw, v_ref[rows, :].astype(u.dtype), _CONTRACT_ROWS,
                                 preferred_element_type=F32)              # [bp, N]

  inc_ref[...] = lax.fori_loop(0, u_ref.shape[0] // block_k, body,
                               jnp.zeros(inc_ref.shape, F32))


def chunk_state(u, v, w, *, chunk_len: int, block_p: int = 64, num_warps: int = 4,
                num_stages: int = 2, interpret: bool = False):
  """Each chunk's own contribution to the state: inc[b, c, h] = sum_s w_s u_s^T v_s.

  u [B, T, H, P], v [B, T, G, N], w [B, H, T] f32. Returns inc [B, C, H, P, N] f32.
  Fully parallel over (P blocks, H, chunks, B).
  """
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      u, v, chunk_len)
  bp = check_block("pallas", "block_p", block_p, head_dim)
  grid = (head_dim // bp, n_heads, n_chunks, batch)
  return pl.pallas_call(
      functools.partial(_chunk_state_kernel, block_k=largest_divisor(q, 64)), grid=grid,
      in_specs=[
          pl.BlockSpec((None, q, None, bp), lambda p, h, k, b: (b, k, h, p)),
          pl.BlockSpec((None, q, None, d_state), lambda p, h, k, b: (b, k, h // hg, 0)),
          pl.BlockSpec((None, None, q), lambda p, h, k, b: (b, h, k)),
      ],
      out_specs=pl.BlockSpec((None, None, None, bp, d_state),
                             lambda p, h, k, b: (b, k, h, p, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), F32),
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_chunk_state",
  )(u, v, w)


# ------------------------------------------------------------------------------------
# state_pass


def _state_pass_kernel(inc_ref, decay_ref, init_ref, *rest, n_chunks, reverse, with_other):
  if with_other:
    other_ref, carries_ref, final_ref, dots_ref = rest
  else:
    carries_ref, final_ref = rest

  def body(k, carry):                                                     # carry: [bs] f32
    c = (n_chunks - 1 - k) if reverse else k
    carries_ref[c] = carry.astype(carries_ref.dtype)
    if with_other:
      dots_ref[c] = jnp.sum(carry * other_ref[c].astype(F32))
    return decay_ref[c] * carry + inc_ref[c]

  final_ref[...] = lax.fori_loop(0, n_chunks, body, init_ref[...].astype(F32))


def state_pass(inc, decay, init, other=None, *, reverse: bool, out_dtype,
               block_s: int = 1024, num_warps: int = 4, num_stages: int = 2,
               interpret: bool = False):
  """carry_{c+1} = decay_c * carry_c + inc_c over the chunks (in reverse if `reverse`).

  inc [B, C, H, P, N] f32, decay [B, H, C] f32, init [B, H, P, N] f32, other optional
  [B, C, H, P, N]. Sequential over chunks, parallel over (B, H, blocks of `block_s` of the
  P*N state elements): a memory-bound elementwise recurrence.
  Returns carries [B, C, H, P, N] in out_dtype (the carry before chunk c is added, in scan
  order), final [B, H, P, N] f32, and with `other` dots [B, H, P*N/block_s, C] f32, the
  partial sums of carry-before-chunk-c * other[c].
  """
  batch, n_chunks, n_heads, head_dim, d_state = inc.shape
  size = head_dim * d_state
  bs = check_block("pallas", "block_s", block_s, size)
  n_sb = size // bs
  flat = lambda a: a.reshape(a.shape[:-2] + (size,))
  grid = (n_sb, n_heads, batch)
  chunk_block = pl.BlockSpec((None, n_chunks, None, bs), lambda k, h, b: (b, 0, h, k))
  in_specs = [chunk_block,
              pl.BlockSpec((None, None, n_chunks), lambda k, h, b: (b, h, 0)),
              pl.BlockSpec((None, None, bs), lambda k, h, b: (b, h, k))]
  args = [flat(inc), decay, flat(init)]
  out_shape = [jax.ShapeDtypeStruct((batch, n_chunks, n_heads, size), out_dtype),
               jax.ShapeDtypeStruct((batch, n_heads, size), F32)]
  out_specs = [chunk_block, pl.BlockSpec((None, None, bs), lambda k, h, b: (b, h, k))]
  if other is not None:
    in_specs.append(chunk_block)
    args.append(flat(other))
    out_shape.append(jax.ShapeDtypeStruct((batch, n_heads, n_sb, n_chunks), F32))
    out_specs.append(pl.BlockSpec((None, None, None, n_chunks), lambda k, h, b: (b, h, k, 0)))
  kernel = functools.partial(_state_pass_kernel, n_chunks=n_chunks, reverse=reverse,
                             with_other=other is not None)
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_state_pass_rev" if reverse else "ssd_state_pass",
  )(*args)
  carries = outs[0].reshape(inc.shape)
  final = outs[1].reshape(init.shape)
  return carries, final, (outs[2] if other is not None else None)


# ------------------------------------------------------------------------------------
# state_scan (chunk_state and state_pass fused; the `state_impl="fused"` option)


def _state_scan_kernel(u_ref, v_ref, w_ref, decay_ref, init_ref, *rest, chunk_len,
                       n_chunks, reverse, with_other):
  if with_other:
    other_ref, carries_ref, final_ref, dots_ref = rest
  else:
    carries_ref, final_ref = rest
  q = chunk_len

  def body(k, carry):                                                     # carry: [bp, N] f32
    c = (n_chunks - 1 - k) if reverse else k
    carries_ref[c] = carry.astype(carries_ref.dtype)
    if with_other:
      dots_ref[c] = jnp.sum(carry * other_ref[c].astype(F32))
    rows = pl.ds(pl.multiple_of(c * q, q), q)
    u = u_ref[rows, :]                                                    # [Q, bp]
    uw = (u.astype(F32) * w_ref[rows][:, None]).astype(u.dtype)
    inc = lax.dot_general(uw, v_ref[rows, :].astype(u.dtype), _CONTRACT_ROWS,
                          preferred_element_type=F32)
    return decay_ref[c] * carry + inc

  final_ref[...] = lax.fori_loop(0, n_chunks, body, init_ref[...].astype(F32))


def state_scan(u, v, w, decay, init, other=None, *, chunk_len: int, reverse: bool, out_dtype,
               block_p: int = 32, num_warps: int = 4, num_stages: int = 2,
               interpret: bool = False):
  """chunk_state and state_pass in one kernel: one program per (batch, head, P block) walks
  the chunks, computing each chunk's increment and updating the carry. Fewer bytes than
  the split pair, but the increment's matmul sits on the serial chain (latency-bound).
  Same arguments and results as `state_pass` with u, v, w in place of inc.
  """
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  n_chunks = seqlen // chunk_len
  hg = n_heads // n_groups
  bp = check_block("pallas", "block_p", block_p, head_dim)
  n_pb = head_dim // bp
  grid = (n_pb, n_heads, batch)
  state_block = pl.BlockSpec((None, n_chunks, None, bp, d_state),
                             lambda p, h, b: (b, 0, h, p, 0))
  in_specs = [
      pl.BlockSpec((None, seqlen, None, bp), lambda p, h, b: (b, 0, h, p)),
      pl.BlockSpec((None, seqlen, None, d_state), lambda p, h, b: (b, 0, h // hg, 0)),
      pl.BlockSpec((None, None, seqlen), lambda p, h, b: (b, h, 0)),
      pl.BlockSpec((None, None, n_chunks), lambda p, h, b: (b, h, 0)),
      pl.BlockSpec((None, None, bp, d_state), lambda p, h, b: (b, h, p, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), out_dtype),
               jax.ShapeDtypeStruct((batch, n_heads, head_dim, d_state), F32)]
  out_specs = [state_block,
               pl.BlockSpec((None, None, bp, d_state), lambda p, h, b: (b, h, p, 0))]
  args = [u, v, w, decay, init]
  if other is not None:
    in_specs.append(state_block)
    args.append(other)
    out_shape.append(jax.ShapeDtypeStruct((batch, n_heads, n_pb, n_chunks), F32))
    out_specs.append(pl.BlockSpec((None, None, None, n_chunks), lambda p, h, b: (b, h, p, 0)))
  kernel = functools.partial(_state_scan_kernel, chunk_len=chunk_len, n_chunks=n_chunks,
                             reverse=reverse, with_other=other is not None)
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_state_scan_rev" if reverse else "ssd_state_scan",
  )(*args)
  return outs[0], outs[1], (outs[2] if other is not None else None)


# ------------------------------------------------------------------------------------
# chunk_scan_fwd


def _chunk_scan_fwd_kernel(x_ref, dt_ref, cs_ref, cb_ref, c_ref, state_ref, *rest,
                           block_l, with_d):
  if with_d:
    d_ref, y_ref = rest
  else:
    (y_ref,) = rest
  i = pl.program_id(0)
  l0 = pl.multiple_of(i * block_l, block_l)
  rows_l = pl.ds(l0, block_l)
  cs_l = cs_ref[rows_l]                                                   # [bl]
  # The state carried in from earlier chunks, decayed to each step: exp(cs_l) C_l state^T.
  state = state_ref[...]                                                  # [P, N]
  acc = lax.dot_general(c_ref[...].astype(state.dtype), state, _CONTRACT_COLS,
                        preferred_element_type=F32)                       # [bl, P]
  acc = acc * jnp.exp(cs_l)[:, None]

  def body(j, acc):
    s0 = pl.multiple_of(j * block_l, block_l)
    rows_s = pl.ds(s0, block_l)
    scores = cb_ref[:, rows_s] * _causal_decay(cs_l, cs_ref[rows_s], l0, s0)
    scores = scores * dt_ref[rows_s][None, :]                             # [bl, bs]
    x_s = x_ref[rows_s, :]
    return acc + jnp.dot(scores.astype(x_s.dtype), x_s, preferred_element_type=F32)

  acc = lax.fori_loop(0, i + 1, body, acc)
  if with_d:
    acc = acc + d_ref[...][None, :] * x_ref[rows_l, :].astype(F32)
  y_ref[...] = acc.astype(y_ref.dtype)


def chunk_scan_fwd(x, dt, cs, cb, c, states, d, *, chunk_len: int, block_l: int = 64,
                   num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """y [B, T, H, P] in x.dtype from x, dt/cs [B, H, T], cb [B, C, G, Q, Q], C, the states
  entering each chunk [B, C, H, P, N] and D [H, P] (or None)."""
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      x, c, chunk_len)
  bl = check_block("pallas", "block_l", block_l, q)
  n_lb = q // bl
  grid = (n_lb, n_heads, n_chunks, batch)
  in_specs = [
      pl.BlockSpec((None, q, None, head_dim), lambda i, h, k, b: (b, k, h, 0)),
      pl.BlockSpec((None, None, q), lambda i, h, k, b: (b, h, k)),
      pl.BlockSpec((None, None, q), lambda i, h, k, b: (b, h, k)),
      pl.BlockSpec((None, None, None, bl, q), lambda i, h, k, b: (b, k, h // hg, i, 0)),
      pl.BlockSpec((None, bl, None, d_state), lambda i, h, k, b: (b, k * n_lb + i, h // hg, 0)),
      pl.BlockSpec((None, None, None, head_dim, d_state), lambda i, h, k, b: (b, k, h, 0, 0)),
  ]
  args = [x, dt, cs, cb, c, states]
  if d is not None:
    in_specs.append(pl.BlockSpec((None, head_dim), lambda i, h, k, b: (h, 0)))
    args.append(d)
  kernel = functools.partial(_chunk_scan_fwd_kernel, block_l=bl, with_d=d is not None)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bl, None, head_dim),
                             lambda i, h, k, b: (b, k * n_lb + i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_chunk_scan_fwd",
  )(*args)


# ------------------------------------------------------------------------------------
# chunk_scan_bwd_dx


def _chunk_scan_bwd_dx_kernel(dy_ref, x_ref, dt_ref, cs_ref, cb_ref, b_ref, dstate_ref, *rest,
                              block_l, n_lb, with_d):
  if with_d:
    d_ref, dx_ref, ddt_ref = rest
  else:
    dx_ref, ddt_ref = rest
  j = pl.program_id(0)
  s0 = pl.multiple_of(j * block_l, block_l)
  rows_s = pl.ds(s0, block_l)
  cs_s = cs_ref[rows_s]
  q = cs_ref.shape[0]
  cs_last = cs_ref[q - 1]
  # Through the state leaving the chunk: exp(cs_last - cs_s) B_s dstate^T.
  dstate = dstate_ref[...]                                                # [P, N]
  acc = lax.dot_general(b_ref[...].astype(dstate.dtype), dstate, _CONTRACT_COLS,
                        preferred_element_type=F32)                       # [bs, P]
  acc = acc * jnp.exp(cs_last - cs_s)[:, None]

  def body(i, acc):
    l0 = pl.multiple_of(i * block_l, block_l)
    rows_l = pl.ds(l0, block_l)
    scores = cb_ref[rows_l, :] * _causal_decay(cs_ref[rows_l], cs_s, l0, s0)   # [bl, bs]
    dy_l = dy_ref[rows_l, :]
    return acc + lax.dot_general(scores.astype(dy_l.dtype), dy_l, _CONTRACT_ROWS,
                                 preferred_element_type=F32)

  acc = lax.fori_loop(j, n_lb, body, acc)
  x_s = x_ref[...].astype(F32)
  ddt_ref[...] = jnp.sum(acc * x_s, axis=1)
  dx = acc * dt_ref[rows_s][:, None]
  if with_d:
    dx = dx + d_ref[...][None, :] * dy_ref[rows_s, :].astype(F32)
  dx_ref[...] = dx.astype(dx_ref.dtype)


def chunk_scan_bwd_dx(dy, x, dt, cs, cb, b, dstates, d, *, chunk_len: int, block_l: int = 64,
                      num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """dx [B, T, H, P] (x.dtype) and the direct d(dt) [B, H, T] f32 (the part not through cs).

  dstates [B, C, H, P, N]: gradient of the state leaving each chunk.
  """
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      x, b, chunk_len)
  bl = check_block("pallas", "block_l", block_l, q)
  n_lb = q // bl
  grid = (n_lb, n_heads, n_chunks, batch)
  in_specs = [
      pl.BlockSpec((None, q, None, head_dim), lambda j, h, k, bb: (bb, k, h, 0)),
      pl.BlockSpec((None, bl, None, head_dim), lambda j, h, k, bb: (bb, k * n_lb + j, h, 0)),
      pl.BlockSpec((None, None, q), lambda j, h, k, bb: (bb, h, k)),
      pl.BlockSpec((None, None, q), lambda j, h, k, bb: (bb, h, k)),
      pl.BlockSpec((None, None, None, q, bl), lambda j, h, k, bb: (bb, k, h // hg, 0, j)),
      pl.BlockSpec((None, bl, None, d_state), lambda j, h, k, bb: (bb, k * n_lb + j, h // hg, 0)),
      pl.BlockSpec((None, None, None, head_dim, d_state), lambda j, h, k, bb: (bb, k, h, 0, 0)),
  ]
  args = [dy, x, dt, cs, cb, b, dstates]
  if d is not None:
    in_specs.append(pl.BlockSpec((None, head_dim), lambda j, h, k, bb: (h, 0)))
    args.append(d)
  kernel = functools.partial(_chunk_scan_bwd_dx_kernel, block_l=bl, n_lb=n_lb,
                             with_d=d is not None)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bl, None, head_dim),
                              lambda j, h, k, bb: (bb, k * n_lb + j, h, 0)),
                 pl.BlockSpec((None, None, bl), lambda j, h, k, bb: (bb, h, k * n_lb + j))],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)],
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_chunk_scan_bwd_dx",
  )(*args)


# ------------------------------------------------------------------------------------
# chunk_dcb


def _chunk_dcb_kernel(dy_ref, x_ref, dt_ref, cs_l_ref, cs_s_ref, cb_ref,
                      dcb_ref, erow_ref, ecol_ref, *, block_l, n_heads):
  j = pl.program_id(0)
  i = pl.program_id(1)

  @pl.when(i >= j)
  def _():
    l0 = i * block_l
    s0 = j * block_l
    cb = cb_ref[...].astype(F32)                                          # [bl, bs]

    def head(hl, acc):
      dm = lax.dot_general(dy_ref[:, hl, :], x_ref[:, hl, :], _CONTRACT_COLS,
                           preferred_element_type=F32)                    # dy_l . x_s
      grad = dm * _causal_decay(cs_l_ref[hl], cs_s_ref[hl], l0, s0) * dt_ref[hl][None, :]
      e = grad * cb
      erow_ref[hl, :] = jnp.sum(e, axis=1)
      ecol_ref[hl, :] = jnp.sum(e, axis=0)
      return acc + grad

    dcb_ref[...] = lax.fori_loop(0, n_heads, head, jnp.zeros(dcb_ref.shape, F32))

  @pl.when(i < j)
  def _():
    # Tiles above the diagonal: dCB is zero there and they add nothing to d(cs).
    dcb_ref[...] = jnp.zeros(dcb_ref.shape, F32)

    def head(hl, carry):
      erow_ref[hl, :] = jnp.zeros((block_l,), F32)
      ecol_ref[hl, :] = jnp.zeros((block_l,), F32)
      return carry

    lax.fori_loop(0, n_heads, head, 0)


def chunk_dcb(dy, x, dt, cs, cb, *, chunk_len: int, n_groups: int, block_l: int = 64,
              heads: int = 20, num_warps: int = 4, num_stages: int = 2,
              interpret: bool = False):
  """Gradient of CB summed over the heads of each group, and the per-head sums of
  E = dCB_h * CB over source steps (erow) and over target steps (ecol).

  Each program takes `heads` heads of a group (the largest divisor of the group size not
  above it); their partial dCB are added afterwards.
  Returns dcb [B, C, G, Q, Q] f32, erow and ecol [B, H, Q/block_l, T] f32 (one partial
  sum per block of the other index; sum over axis 2).
  """
  batch, seqlen, n_heads, head_dim = x.shape
  q = chunk_len
  n_chunks = seqlen // q
  hp = largest_divisor(n_heads // n_groups, heads)
  n_split = n_heads // n_groups // hp
  bl = check_block("pallas", "block_l", block_l, q)
  n_lb = q // bl
  grid = (n_lb, n_lb, n_heads // hp, n_chunks, batch)
  in_specs = [
      pl.BlockSpec((None, bl, hp, head_dim), lambda j, i, m, k, b: (b, k * n_lb + i, m, 0)),
      pl.BlockSpec((None, bl, hp, head_dim), lambda j, i, m, k, b: (b, k * n_lb + j, m, 0)),
      pl.BlockSpec((None, hp, bl), lambda j, i, m, k, b: (b, m, k * n_lb + j)),
      pl.BlockSpec((None, hp, bl), lambda j, i, m, k, b: (b, m, k * n_lb + i)),
      pl.BlockSpec((None, hp, bl), lambda j, i, m, k, b: (b, m, k * n_lb + j)),
      pl.BlockSpec((None, None, None, bl, bl), lambda j, i, m, k, b: (b, k, m // n_split, i, j)),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, None, bl, bl),
                   lambda j, i, m, k, b: (b, m % n_split, k, m // n_split, i, j)),
      pl.BlockSpec((None, hp, None, bl), lambda j, i, m, k, b: (b, m, j, k * n_lb + i)),
      pl.BlockSpec((None, hp, None, bl), lambda j, i, m, k, b: (b, m, i, k * n_lb + j)),
  ]
  out_shape = [jax.ShapeDtypeStruct((batch, n_split, n_chunks, n_groups, q, q), F32),
               jax.ShapeDtypeStruct((batch, n_heads, n_lb, seqlen), F32),
               jax.ShapeDtypeStruct((batch, n_heads, n_lb, seqlen), F32)]
  kernel = functools.partial(_chunk_dcb_kernel, block_l=bl, n_heads=hp)
  dcb, erow, ecol = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_chunk_dcb",
  )(dy, x, dt, cs, cs, cb)
  return jnp.sum(dcb, axis=1), erow, ecol


# ------------------------------------------------------------------------------------
# head_contract


def _head_contract_kernel(u_ref, w_ref, s_ref, v_ref, acc_ref, r_ref, *, n_heads):
  v = v_ref[...].astype(F32)                                              # [br, N]

  def head(hl, acc):
    s = s_ref[hl]                                                         # [P, N]
    uw = (u_ref[:, hl, :].astype(F32) * w_ref[hl][:, None]).astype(s.dtype)
    t = jnp.dot(uw, s, preferred_element_type=F32)                        # [br, N]
    r_ref[hl, :] = jnp.sum(t * v, axis=1)
    return acc + t

  acc_ref[...] = lax.fori_loop(0, n_heads, head, jnp.zeros(acc_ref.shape, F32))


def head_contract(u, w, s, v, *, chunk_len: int, block_r: int = 64, heads: int = 8,
                  num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """acc[t, g] = sum over heads h of group g of (w_h[t] u_h[t]) @ S_h[chunk of t], and the
  per-head epilogue r_h[t] = v[t, g] . ((w_h[t] u_h[t]) @ S_h).

  u [B, T, H, P], w [B, H, T] f32, s [B, C, H, P, N] (f32 or u's dtype), v [B, T, G, N].
  Each program takes `heads` heads of a group (the largest divisor of the group size not
  above it); their partial sums are added afterwards.
  Returns acc [B, T, G, N] f32 and r [B, H, T] f32.
  """
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  q = chunk_len
  n_chunks = seqlen // q
  hp = largest_divisor(n_heads // n_groups, heads)
  n_split = n_heads // n_groups // hp
  br = check_block("pallas", "block_r", block_r, q)
  n_rb = q // br
  grid = (n_rb, n_heads // hp, n_chunks, batch)
  in_specs = [
      pl.BlockSpec((None, br, hp, head_dim), lambda r, m, k, b: (b, k * n_rb + r, m, 0)),
      pl.BlockSpec((None, hp, br), lambda r, m, k, b: (b, m, k * n_rb + r)),
      pl.BlockSpec((None, None, hp, head_dim, d_state), lambda r, m, k, b: (b, k, m, 0, 0)),
      pl.BlockSpec((None, br, None, d_state),
                   lambda r, m, k, b: (b, k * n_rb + r, m // n_split, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, None, br, None, d_state),
                   lambda r, m, k, b: (b, m % n_split, k * n_rb + r, m // n_split, 0)),
      pl.BlockSpec((None, hp, br), lambda r, m, k, b: (b, m, k * n_rb + r)),
  ]
  out_shape = [jax.ShapeDtypeStruct((batch, n_split, seqlen, n_groups, d_state), F32),
               jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)]
  kernel = functools.partial(_head_contract_kernel, n_heads=hp)
  acc, r = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="ssd_head_contract",
  )(u, w, s, v)
  return jnp.sum(acc, axis=1), r
