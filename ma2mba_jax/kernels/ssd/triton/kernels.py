"""The six SSD kernels in Triton, called through jax-triton (NVIDIA GPUs only).

Same kernels, arguments and results as `pallas/kernels.py` (read that module's docstring
for what each computes); here the tiles are addressed with explicit pointer arithmetic.
Sizes are compile-time constants (`tl.constexpr`), so each shape compiles its own kernels,
as JAX compiles each shape anyway. Row offsets are computed in int64 so that arrays over
2^31 elements address correctly.

Importing this module imports `triton` and `jax_triton`, which need a GPU: the registry
imports it only when `impl="triton"` is asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

from ma2mba_jax.kernels.ssd.common import check_block, largest_divisor

F32 = jnp.float32


def _no_interpreter(interpret: bool) -> None:
  if interpret:
    raise ValueError("ssd triton: there is no interpreter for the triton backend; use "
                     "impl='pallas' with interpret=True off GPU")


@triton.jit
def _causal_decay(cs_l, cs_s, offs_l, offs_s):
  diff = tl.where(offs_l[:, None] >= offs_s[None, :], cs_l[:, None] - cs_s[None, :],
                  float("-inf"))
  return tl.exp(diff)


# ------------------------------------------------------------------------------------
# chunk_state


@triton.jit
def _chunk_state_kernel(u_ptr, v_ptr, w_ptr, inc_ptr,
                        T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                        N: tl.constexpr, Q: tl.constexpr, NC: tl.constexpr,
                        BP: tl.constexpr, BK: tl.constexpr):
  pid_p = tl.program_id(0)
  h = tl.program_id(1)
  c = tl.program_id(2) % NC
  b = tl.program_id(2) // NC
  g = h // (H // G)
  offs_p = pid_p * BP + tl.arange(0, BP)
  offs_n = tl.arange(0, N)
  w_base = (b * H + h).to(tl.int64) * T + c * Q
  inc = tl.zeros((BP, N), dtype=tl.float32)
  for k in range(Q // BK):
    offs_q = k * BK + tl.arange(0, BK)
    rows = (b * T + c * Q + offs_q).to(tl.int64)                          # [BK]
    # u loaded transposed ([BP, BK]) so that the matmul needs no register transpose.
    u_t = tl.load(u_ptr + (rows[None, :] * H + h) * P + offs_p[:, None])
    w = tl.load(w_ptr + w_base + offs_q)
    uw_t = (u_t.to(tl.float32) * w[None, :]).to(u_t.dtype)
    v = tl.load(v_ptr + (rows[:, None] * G + g) * N + offs_n[None, :]).to(u_t.dtype)
    inc += tl.dot(uw_t, v)                                                # [BP, N]
  tl.store(inc_ptr + ((b * NC + c) * H + h).to(tl.int64) * P * N
           + offs_p[:, None] * N + offs_n[None, :], inc)


def chunk_state(u, v, w, *, chunk_len: int, block_p: int = 64, num_warps: int = 4,
                num_stages: int = 2, interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  n_chunks = seqlen // chunk_len
  bp = check_block("triton", "block_p", block_p, head_dim)
  return jt.triton_call(
      u, v, w, kernel=_chunk_state_kernel,
      out_shape=jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), F32),
      grid=(head_dim // bp, n_heads, n_chunks * batch), num_warps=num_warps,
      num_stages=num_stages, name="ssd_chunk_state",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, N=d_state, Q=chunk_len, NC=n_chunks, BP=bp,
      BK=largest_divisor(chunk_len, 64))


# ------------------------------------------------------------------------------------
# state_pass


@triton.jit
def _state_pass_kernel(inc_ptr, decay_ptr, init_ptr, other_ptr, carries_ptr, final_ptr, dots_ptr,
                       H: tl.constexpr, S: tl.constexpr, NC: tl.constexpr, BS: tl.constexpr,
                       REVERSE: tl.constexpr, WITH_OTHER: tl.constexpr):
  NSB: tl.constexpr = S // BS
  k = tl.program_id(0)
  h = tl.program_id(1)
  b = tl.program_id(2)
  bh = b * H + h
  offs = k * BS + tl.arange(0, BS)
  carry = tl.load(init_ptr + bh.to(tl.int64) * S + offs).to(tl.float32)
  for step in range(NC):
    if REVERSE:
      c = NC - 1 - step
    else:
      c = step
    base = ((b * NC + c) * H + h).to(tl.int64) * S + offs
    tl.store(carries_ptr + base, carry.to(carries_ptr.dtype.element_ty))
    if WITH_OTHER:
      other = tl.load(other_ptr + base).to(tl.float32)
      tl.store(dots_ptr + (bh * NSB + k) * NC + c, tl.sum(carry * other))
    else:
      tl.store(dots_ptr + (bh * NSB + k) * NC + c, 0.0)
    carry = tl.load(decay_ptr + bh * NC + c) * carry + tl.load(inc_ptr + base)
  tl.store(final_ptr + bh.to(tl.int64) * S + offs, carry)


def state_pass(inc, decay, init, other=None, *, reverse: bool, out_dtype,
               block_s: int = 1024, num_warps: int = 4, num_stages: int = 2,
               interpret: bool = False):
  _no_interpreter(interpret)
  batch, n_chunks, n_heads, head_dim, d_state = inc.shape
  size = head_dim * d_state
  bs = check_block("triton", "block_s", block_s, size)
  n_sb = size // bs
  carries, final, dots = jt.triton_call(
      inc, decay, init, init if other is None else other,
      kernel=_state_pass_kernel,
      out_shape=[jax.ShapeDtypeStruct(inc.shape, out_dtype),
                 jax.ShapeDtypeStruct(init.shape, F32),
                 jax.ShapeDtypeStruct((batch, n_heads, n_sb, n_chunks), F32)],
      grid=(n_sb, n_heads, batch), num_warps=num_warps, num_stages=num_stages,
      name="ssd_state_pass",
      H=n_heads, S=size, NC=n_chunks, BS=bs, REVERSE=reverse, WITH_OTHER=other is not None)
  return carries, final, (None if other is None else dots)


# ------------------------------------------------------------------------------------
# state_scan (chunk_state and state_pass fused; the `state_impl="fused"` option)


@triton.jit
def _state_scan_kernel(u_ptr, v_ptr, w_ptr, decay_ptr, init_ptr, other_ptr,
                       carries_ptr, final_ptr, dots_ptr,
                       T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                       N: tl.constexpr, Q: tl.constexpr, NC: tl.constexpr,
                       BP: tl.constexpr, NPB: tl.constexpr, REVERSE: tl.constexpr,
                       WITH_OTHER: tl.constexpr):
  pid_p = tl.program_id(0)
  h = tl.program_id(1)
  b = tl.program_id(2)
  g = h // (H // G)
  offs_p = pid_p * BP + tl.arange(0, BP)
  offs_n = tl.arange(0, N)
  offs_q = tl.arange(0, Q)
  in_state = offs_p[:, None] * N + offs_n[None, :]                        # [BP, N]
  bh = b * H + h
  carry = tl.load(init_ptr + bh.to(tl.int64) * P * N + in_state).to(tl.float32)
  for k in range(NC):
    if REVERSE:
      c = NC - 1 - k
    else:
      c = k
    state_base = ((b * NC + c) * H + h).to(tl.int64) * P * N
    tl.store(carries_ptr + state_base + in_state, carry.to(carries_ptr.dtype.element_ty))
    if WITH_OTHER:
      other = tl.load(other_ptr + state_base + in_state).to(tl.float32)
      tl.store(dots_ptr + (bh * NPB + pid_p) * NC + c, tl.sum(carry * other))
    else:
      tl.store(dots_ptr + (bh * NPB + pid_p) * NC + c, 0.0)
    rows = (b * T + c * Q + offs_q).to(tl.int64)                          # [Q]
    u = tl.load(u_ptr + (rows[:, None] * H + h) * P + offs_p[None, :])    # [Q, BP]
    w = tl.load(w_ptr + bh.to(tl.int64) * T + c * Q + offs_q)
    uw = (u.to(tl.float32) * w[:, None]).to(u.dtype)
    v = tl.load(v_ptr + (rows[:, None] * G + g) * N + offs_n[None, :]).to(u.dtype)
    inc = tl.dot(tl.trans(uw), v)                                         # [BP, N]
    decay = tl.load(decay_ptr + bh * NC + c)
    carry = decay * carry + inc
  tl.store(final_ptr + bh.to(tl.int64) * P * N + in_state, carry)


def state_scan(u, v, w, decay, init, other=None, *, chunk_len: int, reverse: bool, out_dtype,
               block_p: int = 32, num_warps: int = 4, num_stages: int = 2,
               interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  n_chunks = seqlen // chunk_len
  bp = check_block("triton", "block_p", block_p, head_dim)
  n_pb = head_dim // bp
  carries, final, dots = jt.triton_call(
      u, v, w, decay, init, init if other is None else other,
      kernel=_state_scan_kernel,
      out_shape=[jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), out_dtype),
                 jax.ShapeDtypeStruct((batch, n_heads, head_dim, d_state), F32),
                 jax.ShapeDtypeStruct((batch, n_heads, n_pb, n_chunks), F32)],
      grid=(n_pb, n_heads, batch), num_warps=num_warps, num_stages=num_stages,
      name="ssd_state_scan",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, N=d_state, Q=chunk_len, NC=n_chunks,
      BP=bp, NPB=n_pb, REVERSE=reverse, WITH_OTHER=other is not None)
  return carries, final, (None if other is None else dots)


# ------------------------------------------------------------------------------------
# chunk_scan_fwd


@triton.jit
def _chunk_scan_fwd_kernel(x_ptr, dt_ptr, cs_ptr, cb_ptr, c_ptr, state_ptr, d_ptr, y_ptr,
                           T: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
                           G: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                           NC: tl.constexpr, BL: tl.constexpr, HAS_D: tl.constexpr):
  i = tl.program_id(0)
  h = tl.program_id(1)
  c = tl.program_id(2) % NC
  b = tl.program_id(2) // NC
  g = h // (H // G)
  offs_l = i * BL + tl.arange(0, BL)
  offs_p = tl.arange(0, P)
  offs_n = tl.arange(0, N)
  bh = (b * H + h).to(tl.int64)
  rows_l = (b * T + c * Q + offs_l).to(tl.int64)
  cs_l = tl.load(cs_ptr + bh * T + c * Q + offs_l)
  c_l = tl.load(c_ptr + (rows_l[:, None] * G + g) * N + offs_n[None, :])
  state = tl.load(state_ptr + ((b * NC + c) * H + h).to(tl.int64) * P * N
                  + offs_p[:, None] * N + offs_n[None, :])                # [P, N]
  acc = tl.dot(c_l.to(state.dtype), tl.trans(state)) * tl.exp(cs_l)[:, None]
  cb_base = ((b * NC + c) * G + g).to(tl.int64) * Q * Q
  for j in range(0, i + 1):
    offs_s = j * BL + tl.arange(0, BL)
    cs_s = tl.load(cs_ptr + bh * T + c * Q + offs_s)
    dt_s = tl.load(dt_ptr + bh * T + c * Q + offs_s)
    cb = tl.load(cb_ptr + cb_base + offs_l[:, None] * Q + offs_s[None, :])
    scores = cb.to(tl.float32) * _causal_decay(cs_l, cs_s, offs_l, offs_s) * dt_s[None, :]
    rows_s = (b * T + c * Q + offs_s).to(tl.int64)
    x_s = tl.load(x_ptr + (rows_s[:, None] * H + h) * P + offs_p[None, :])
    acc += tl.dot(scores.to(x_s.dtype), x_s)
  x_l_ptrs = (rows_l[:, None] * H + h) * P + offs_p[None, :]
  if HAS_D:
    acc += tl.load(d_ptr + h * P + offs_p)[None, :] * tl.load(x_ptr + x_l_ptrs).to(tl.float32)
  tl.store(y_ptr + x_l_ptrs, acc.to(y_ptr.dtype.element_ty))


def chunk_scan_fwd(x, dt, cs, cb, c, states, d, *, chunk_len: int, block_l: int = 64,
                   num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = c.shape[2:]
  n_chunks = seqlen // chunk_len
  bl = check_block("triton", "block_l", block_l, chunk_len)
  return jt.triton_call(
      x, dt, cs, cb, c, states, cs if d is None else d,
      kernel=_chunk_scan_fwd_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(chunk_len // bl, n_heads, n_chunks * batch), num_warps=num_warps,
      num_stages=num_stages, name="ssd_chunk_scan_fwd",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, N=d_state, Q=chunk_len, NC=n_chunks,
      BL=bl, HAS_D=d is not None)


# ------------------------------------------------------------------------------------
# chunk_scan_bwd_dx


@triton.jit
def _chunk_scan_bwd_dx_kernel(dy_ptr, x_ptr, dt_ptr, cs_ptr, cb_ptr, b_ptr, dstate_ptr, d_ptr,
                              dx_ptr, ddt_ptr,
                              T: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
                              G: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                              NC: tl.constexpr, BL: tl.constexpr, HAS_D: tl.constexpr):
  j = tl.program_id(0)
  h = tl.program_id(1)
  c = tl.program_id(2) % NC
  b = tl.program_id(2) // NC
  g = h // (H // G)
  offs_s = j * BL + tl.arange(0, BL)
  offs_p = tl.arange(0, P)
  offs_n = tl.arange(0, N)
  bh = (b * H + h).to(tl.int64)
  rows_s = (b * T + c * Q + offs_s).to(tl.int64)
  cs_s = tl.load(cs_ptr + bh * T + c * Q + offs_s)
  cs_last = tl.load(cs_ptr + bh * T + c * Q + Q - 1)
  b_s = tl.load(b_ptr + (rows_s[:, None] * G + g) * N + offs_n[None, :])
  dstate = tl.load(dstate_ptr + ((b * NC + c) * H + h).to(tl.int64) * P * N
                   + offs_p[:, None] * N + offs_n[None, :])               # [P, N]
  acc = tl.dot(b_s.to(dstate.dtype), tl.trans(dstate)) * tl.exp(cs_last - cs_s)[:, None]
  cb_base = ((b * NC + c) * G + g).to(tl.int64) * Q * Q
  for i in range(j, Q // BL):
    offs_l = i * BL + tl.arange(0, BL)
    cs_l = tl.load(cs_ptr + bh * T + c * Q + offs_l)
    cb = tl.load(cb_ptr + cb_base + offs_l[:, None] * Q + offs_s[None, :])  # [BL(l), BL(s)]
    scores = cb.to(tl.float32) * _causal_decay(cs_l, cs_s, offs_l, offs_s)
    rows_l = (b * T + c * Q + offs_l).to(tl.int64)
    dy_l = tl.load(dy_ptr + (rows_l[:, None] * H + h) * P + offs_p[None, :])
    acc += tl.dot(tl.trans(scores.to(dy_l.dtype)), dy_l)
  s_ptrs = (rows_s[:, None] * H + h) * P + offs_p[None, :]
  x_s = tl.load(x_ptr + s_ptrs).to(tl.float32)
  tl.store(ddt_ptr + bh * T + c * Q + offs_s, tl.sum(acc * x_s, axis=1))
  dt_s = tl.load(dt_ptr + bh * T + c * Q + offs_s)
  dx = acc * dt_s[:, None]
  if HAS_D:
    dx += tl.load(d_ptr + h * P + offs_p)[None, :] * tl.load(dy_ptr + s_ptrs).to(tl.float32)
  tl.store(dx_ptr + s_ptrs, dx.to(dx_ptr.dtype.element_ty))


def chunk_scan_bwd_dx(dy, x, dt, cs, cb, b, dstates, d, *, chunk_len: int, block_l: int = 64,
                      num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = b.shape[2:]
  n_chunks = seqlen // chunk_len
  bl = check_block("triton", "block_l", block_l, chunk_len)
  return jt.triton_call(
      dy, x, dt, cs, cb, b, dstates, cs if d is None else d,
      kernel=_chunk_scan_bwd_dx_kernel,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)],
      grid=(chunk_len // bl, n_heads, n_chunks * batch), num_warps=num_warps,
      num_stages=num_stages, name="ssd_chunk_scan_bwd_dx",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, N=d_state, Q=chunk_len, NC=n_chunks,
      BL=bl, HAS_D=d is not None)


# ------------------------------------------------------------------------------------
# chunk_dcb


@triton.jit
def _chunk_dcb_kernel(dy_ptr, x_ptr, dt_ptr, cs_ptr, cb_ptr, dcb_ptr, erow_ptr, ecol_ptr,
                      T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                      Q: tl.constexpr, NC: tl.constexpr, BL: tl.constexpr, HP: tl.constexpr):
  NLB: tl.constexpr = Q // BL
  NSPLIT: tl.constexpr = H // G // HP
  j = tl.program_id(0) % NLB
  i = tl.program_id(0) // NLB
  m = tl.program_id(1)                               # head block: heads m*HP .. m*HP+HP-1
  g = m // NSPLIT
  c = tl.program_id(2) % NC
  b = tl.program_id(2) // NC
  offs_l = i * BL + tl.arange(0, BL)
  offs_s = j * BL + tl.arange(0, BL)
  offs_p = tl.arange(0, P)
  in_tile = offs_l[:, None] * Q + offs_s[None, :]
  out_tile = (((b * NSPLIT + m % NSPLIT) * NC + c) * G + g).to(tl.int64) * Q * Q + in_tile
  if i >= j:
    cb = tl.load(cb_ptr + ((b * NC + c) * G + g).to(tl.int64) * Q * Q + in_tile).to(tl.float32)
    rows_l = (b * T + c * Q + offs_l).to(tl.int64)
    rows_s = (b * T + c * Q + offs_s).to(tl.int64)
    acc = tl.zeros((BL, BL), dtype=tl.float32)
    for hl in range(HP):
      h = m * HP + hl
      bh = (b * H + h).to(tl.int64)
      dy_l = tl.load(dy_ptr + (rows_l[:, None] * H + h) * P + offs_p[None, :])
      x_s = tl.load(x_ptr + (rows_s[:, None] * H + h) * P + offs_p[None, :])
      dm = tl.dot(dy_l, tl.trans(x_s))                                    # dy_l . x_s
      cs_l = tl.load(cs_ptr + bh * T + c * Q + offs_l)
      cs_s = tl.load(cs_ptr + bh * T + c * Q + offs_s)
      dt_s = tl.load(dt_ptr + bh * T + c * Q + offs_s)
      grad = dm * _causal_decay(cs_l, cs_s, offs_l, offs_s) * dt_s[None, :]
      e = grad * cb
      tl.store(erow_ptr + (bh * NLB + j) * T + c * Q + offs_l, tl.sum(e, axis=1))
      tl.store(ecol_ptr + (bh * NLB + i) * T + c * Q + offs_s, tl.sum(e, axis=0))
      acc += grad
    tl.store(dcb_ptr + out_tile, acc)
  else:
    tl.store(dcb_ptr + out_tile, tl.zeros((BL, BL), dtype=tl.float32))
    for hl in range(HP):
      bh = (b * H + m * HP + hl).to(tl.int64)
      tl.store(erow_ptr + (bh * NLB + j) * T + c * Q + offs_l, tl.zeros((BL,), tl.float32))
      tl.store(ecol_ptr + (bh * NLB + i) * T + c * Q + offs_s, tl.zeros((BL,), tl.float32))


def chunk_dcb(dy, x, dt, cs, cb, *, chunk_len: int, n_groups: int, block_l: int = 64,
              heads: int = 20, num_warps: int = 4, num_stages: int = 2,
              interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = x.shape
  n_chunks = seqlen // chunk_len
  bl = check_block("triton", "block_l", block_l, chunk_len)
  n_lb = chunk_len // bl
  hp = largest_divisor(n_heads // n_groups, heads)
  n_split = n_heads // n_groups // hp
  dcb, erow, ecol = jt.triton_call(
      dy, x, dt, cs, cb, kernel=_chunk_dcb_kernel,
      out_shape=[jax.ShapeDtypeStruct((batch, n_split, n_chunks, n_groups, chunk_len,
                                       chunk_len), F32),
                 jax.ShapeDtypeStruct((batch, n_heads, n_lb, seqlen), F32),
                 jax.ShapeDtypeStruct((batch, n_heads, n_lb, seqlen), F32)],
      grid=(n_lb * n_lb, n_heads // hp, n_chunks * batch), num_warps=num_warps,
      num_stages=num_stages, name="ssd_chunk_dcb",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, Q=chunk_len, NC=n_chunks, BL=bl, HP=hp)
  return jnp.sum(dcb, axis=1), erow, ecol


# ------------------------------------------------------------------------------------
# head_contract


@triton.jit
def _head_contract_kernel(u_ptr, w_ptr, s_ptr, v_ptr, acc_ptr, r_ptr,
                          T: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
                          G: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                          NC: tl.constexpr, BR: tl.constexpr, HP: tl.constexpr):
  NSPLIT: tl.constexpr = H // G // HP
  r = tl.program_id(0)
  m = tl.program_id(1)                               # head block: heads m*HP .. m*HP+HP-1
  g = m // NSPLIT
  c = tl.program_id(2) % NC
  b = tl.program_id(2) // NC
  offs_t = c * Q + r * BR + tl.arange(0, BR)
  offs_p = tl.arange(0, P)
  offs_n = tl.arange(0, N)
  rows = (b * T + offs_t).to(tl.int64)
  v = tl.load(v_ptr + (rows[:, None] * G + g) * N + offs_n[None, :]).to(tl.float32)
  acc = tl.zeros((BR, N), dtype=tl.float32)
  for hl in range(HP):
    h = m * HP + hl
    bh = (b * H + h).to(tl.int64)
    s = tl.load(s_ptr + ((b * NC + c) * H + h).to(tl.int64) * P * N
                + offs_p[:, None] * N + offs_n[None, :])                  # [P, N]
    u = tl.load(u_ptr + (rows[:, None] * H + h) * P + offs_p[None, :]).to(tl.float32)
    uw = (u * tl.load(w_ptr + bh * T + offs_t)[:, None]).to(s.dtype)
    t = tl.dot(uw, s)                                                     # [BR, N]
    tl.store(r_ptr + bh * T + offs_t, tl.sum(t * v, axis=1))
    acc += t
  out_rows = ((b * NSPLIT + m % NSPLIT) * T + offs_t).to(tl.int64)
  tl.store(acc_ptr + (out_rows[:, None] * G + g) * N + offs_n[None, :], acc)


def head_contract(u, w, s, v, *, chunk_len: int, block_r: int = 64, heads: int = 8,
                  num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  _no_interpreter(interpret)
  batch, seqlen, n_heads, head_dim = u.shape
  n_groups, d_state = v.shape[2:]
  n_chunks = seqlen // chunk_len
  br = check_block("triton", "block_r", block_r, chunk_len)
  hp = largest_divisor(n_heads // n_groups, heads)
  n_split = n_heads // n_groups // hp
  acc, r = jt.triton_call(
      u, w, s, v, kernel=_head_contract_kernel,
      out_shape=[jax.ShapeDtypeStruct((batch, n_split, seqlen, n_groups, d_state), F32),
                 jax.ShapeDtypeStruct((batch, n_heads, seqlen), F32)],
      grid=(chunk_len // br, n_heads // hp, n_chunks * batch), num_warps=num_warps,
      num_stages=num_stages, name="ssd_head_contract",
      T=seqlen, H=n_heads, P=head_dim, G=n_groups, N=d_state, Q=chunk_len, NC=n_chunks,
      BR=br, HP=hp)
  return jnp.sum(acc, axis=1), r
