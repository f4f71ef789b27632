"""The Pallas kernels of the chunked SSD with the Mosaic TPU lowering.

The same six-kernel contract as `pallas/kernels.py` (names, arguments, results and their
layouts), so that `kernels/ssd/chunked.py` (padding, cs, CB, segment masks, the custom_vjp and
the reductions of the backward) drives them unchanged. Only the inside differs:

- Layout. Each wrapper regroups its operands per (head, chunk) so that every block's last
  two dims are the whole of the array's last two dims, which Mosaic always accepts:
      x, dy [B, T, H, P]   -> [B, H, C, Q, P]   (or [B, H, C, P, Q] where it is the lhs
                                                  of a contraction over time)
      B, C  [B, T, G, N]   -> [B, G, C, Q, N]
      per-step f32 [B, H, T] -> rows [B, H, C, 1, Q] (lane-dense, Q on the 128 lanes) or
                                columns [B, H, C, Q, 1] (where they scale rows)
      chunk states [B, C, H, P, N] and CB [B, C, G, Q, Q] stay as they are.
  With the released shapes (Q = 256, P = 64, N = 128) the tiles are (256, 64), (256, 128),
  (64, 128), (256, 256): multiples of (8, 128) except P = 64 on the lanes of x's tile
  (Mosaic masks the unused half; padding P to 128 would double those matmuls). The
  regrouping transposes are XLA ops around the kernels (jit shares one per operand).
- One program per (batch, head, chunk): the whole Q x Q intra-chunk tile in VMEM (256 KiB
  in f32 at Q = 256), no inner loops (the GPU kernels loop over 64-row tiles).
- Sums over the heads of a group (chunk_dcb, head_contract) and the recurrence over chunks
  (state_pass) run as an "arbitrary" (sequential) innermost grid axis that accumulates in
  the resident output block (or a VMEM scratch carry); the other axes are "parallel"
  (split over the TensorCores of a megacore chip).
- Matmuls are plain (m, k) x (k, n) or (m, k) x (n, k)^T (the rhs-transposed form of
  attention's q k^T); the lhs is never transposed in a kernel (the wrappers pass x^T or
  CB^T instead).

`interpret`: False lowers to Mosaic (a `tpu_custom_call`); True (or a
`pltpu.InterpretParams`) runs Pallas' TPU interpret mode, which simulates the TPU's memory
spaces on CPU; None picks per lowering platform with `lax.platform_dependent` (Mosaic when
lowered for TPU, interpret mode elsewhere), so `jax.export(..., platforms=["tpu"])` from a
CPU host holds the Mosaic kernels while a CPU run interprets them.

Letters: B batch, T time, H heads, P head dim, N state, G groups, C chunks, Q chunk len;
l / s target / source step in a chunk; hg heads per group (head h reads group h // hg; index maps use lax.div, since
jnp's floor division lowers through `sign`, whose Mosaic rule asks for the TPU generation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ma2mba_jax.kernels.ssd.common import dims

F32 = jnp.float32
_RHS_T = (((1,), (1,)), ((), ()))   # a b^T

PARALLEL, ARBITRARY = "parallel", "arbitrary"


def _interpret_params(interpret):
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  return pltpu.InterpretParams() if interpret else False


def _call(kernel, *, grid, in_specs, out_specs, out_shape, semantics, name, interpret,
          scratch_shapes=()):
  """pl.pallas_call with Mosaic compiler params; `interpret` as in the module docstring."""
  def run(mode, *args):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch_shapes, interpret=mode, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    )(*args)

  if interpret is None:
    return lambda *args: lax.platform_dependent(
        *args, tpu=functools.partial(run, False), default=functools.partial(run, True))
  return functools.partial(run, _interpret_params(interpret))


# ------------------------------------------------------------------------------------
# Layout changes (XLA, outside the kernels)


def by_chunk(a, q):
  """[B, T, K, D] -> [B, K, C, Q, D]."""
  b, t, k, d = a.shape
  return jnp.transpose(a.reshape(b, t // q, q, k, d), (0, 3, 1, 2, 4))


def by_chunk_t(a, q):
  """[B, T, K, D] -> [B, K, C, D, Q]."""
  b, t, k, d = a.shape
  return jnp.transpose(a.reshape(b, t // q, q, k, d), (0, 3, 1, 4, 2))


def unchunk(a):
  """[B, K, C, Q, D] -> [B, T, K, D]."""
  b, k, c, q, d = a.shape
  return jnp.transpose(a, (0, 2, 3, 1, 4)).reshape(b, c * q, k, d)


def rows(w, q):
  """[B, H, T] -> [B, H, C, 1, Q]."""
  b, h, t = w.shape
  return w.reshape(b, h, t // q, 1, q)


def cols(w, q):
  """[B, H, T] -> [B, H, C, Q, 1]."""
  b, h, t = w.shape
  return w.reshape(b, h, t // q, q, 1)


def _tile(n_lead: int):
  """Block specs of one whole 2-D tile: `n_lead` squeezed (None) leading axes."""
  def spec(shape2, index_map):
    return pl.BlockSpec((None,) * n_lead + tuple(shape2), index_map)
  return spec


def _causal_decay(cs_col, cs_row):
  """exp(cs_l - cs_s) where l >= s, else 0: [Q, Q] from cs_col [Q, 1] (l), cs_row [1, Q] (s).
  The masked exponent is <= 0."""
  q = cs_col.shape[0]
  l_idx = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  s_idx = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return jnp.exp(jnp.where(l_idx >= s_idx, cs_col - cs_row, -jnp.inf))


def _sum_all(a):
  """[M, K] -> [1, 1] (two single-axis reductions: the forms Mosaic lowers)."""
  return jnp.sum(jnp.sum(a, axis=1, keepdims=True), axis=0, keepdims=True)


# ------------------------------------------------------------------------------------
# chunk_state


def _chunk_state_kernel(ut_ref, v_ref, w_ref, inc_ref):
  ut = ut_ref[...]                                                        # [P, Q]
  uw = (ut.astype(F32) * w_ref[...]).astype(ut.dtype)                    # w: [1, Q]
  inc_ref[...] = jnp.dot(uw, v_ref[...].astype(ut.dtype),
                         preferred_element_type=F32)                      # [P, N]


def chunk_state(u, v, w, *, chunk_len: int, interpret=None, **_):
  """inc[b, c, h] = sum_s w_s u_s^T v_s: u [B, T, H, P], v [B, T, G, N], w [B, H, T] f32
  -> [B, C, H, P, N] f32. Grid (B, H, C), all parallel."""
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      u, v, chunk_len)
  t5 = _tile(3)
  call = _call(
      _chunk_state_kernel, grid=(batch, n_heads, n_chunks),
      in_specs=[t5((head_dim, q), lambda b, h, c: (b, h, c, 0, 0)),
                t5((q, d_state), lambda b, h, c: (b, lax.div(h, hg), c, 0, 0)),
                t5((1, q), lambda b, h, c: (b, h, c, 0, 0))],
      out_specs=t5((head_dim, d_state), lambda b, h, c: (b, c, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, n_chunks, n_heads, head_dim, d_state), F32),
      semantics=(PARALLEL, PARALLEL, PARALLEL), name="ssd_tpu_chunk_state",
      interpret=interpret)
  return call(by_chunk_t(u, q), by_chunk(v, q), rows(w, q))


# ------------------------------------------------------------------------------------
# state_pass


def _state_pass_kernel(inc_ref, decay_ref, init_ref, *rest, with_other):
  if with_other:
    other_ref, carries_ref, final_ref, dots_ref, carry_ref = rest
  else:
    carries_ref, final_ref, carry_ref = rest
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    carry_ref[...] = init_ref[...].astype(F32)

  carry = carry_ref[...]                                                  # [P, N] f32
  carries_ref[...] = carry.astype(carries_ref.dtype)
  if with_other:
    dots_ref[...] = _sum_all(carry * other_ref[...].astype(F32))         # [1, 1]
  carry = decay_ref[...] * carry + inc_ref[...]                           # decay: [1, 1]
  carry_ref[...] = carry

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = carry


def state_pass(inc, decay, init, other=None, *, reverse: bool, out_dtype, interpret=None,
               **_):
  """carry_{c+1} = decay_c * carry_c + inc_c over the chunks (in reverse if `reverse`).

  inc [B, C, H, P, N] f32, decay [B, H, C] f32, init [B, H, P, N] f32, other optional
  [B, C, H, P, N]. Grid (B, H, C): the chunk axis is sequential ("arbitrary") and the
  carry lives in a VMEM scratch tile. Returns carries [B, C, H, P, N] in out_dtype (the
  carry before chunk c is added), final [B, H, P, N] f32 and, with `other`, dots
  [B, H, 1, C] f32 (sum of carry-before-chunk-c * other[c]).
  """
  batch, n_chunks, n_heads, head_dim, d_state = inc.shape
  cidx = (lambda k: n_chunks - 1 - k) if reverse else (lambda k: k)
  state = (head_dim, d_state)
  chunk_state_spec = _tile(3)(state, lambda b, h, k: (b, cidx(k), h, 0, 0))
  in_specs = [chunk_state_spec,
              _tile(3)((1, 1), lambda b, h, k: (b, h, cidx(k), 0, 0)),
              _tile(2)(state, lambda b, h, k: (b, h, 0, 0))]
  args = [inc, decay.reshape(batch, n_heads, n_chunks, 1, 1), init]
  out_shape = [jax.ShapeDtypeStruct(inc.shape, out_dtype),
               jax.ShapeDtypeStruct((batch, n_heads, head_dim, d_state), F32)]
  out_specs = [chunk_state_spec, _tile(2)(state, lambda b, h, k: (b, h, 0, 0))]
  if other is not None:
    in_specs.append(chunk_state_spec)
    args.append(other)
    out_shape.append(jax.ShapeDtypeStruct((batch, n_heads, n_chunks, 1, 1), F32))
    out_specs.append(_tile(3)((1, 1), lambda b, h, k: (b, h, cidx(k), 0, 0)))
  outs = _call(
      functools.partial(_state_pass_kernel, with_other=other is not None),
      grid=(batch, n_heads, n_chunks), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM(state, F32)],
      semantics=(PARALLEL, PARALLEL, ARBITRARY),
      name="ssd_tpu_state_pass_rev" if reverse else "ssd_tpu_state_pass",
      interpret=interpret)(*args)
  dots = outs[2].reshape(batch, n_heads, 1, n_chunks) if other is not None else None
  return outs[0], outs[1], dots


def state_scan(*args, **kwargs):
  raise NotImplementedError("ssd tpu: state_impl='fused' has no TPU kernel; use 'split'")


# ------------------------------------------------------------------------------------
# chunk_scan_fwd


def _chunk_scan_fwd_kernel(x_ref, dt_ref, cs_col_ref, cs_row_ref, cb_ref, c_ref, state_ref,
                           *rest, with_d):
  if with_d:
    d_ref, y_ref = rest
  else:
    (y_ref,) = rest
  cs_col = cs_col_ref[...]                                                # [Q, 1]
  # The state carried in from earlier chunks, decayed to each step: exp(cs_l) C_l state^T.
  state = state_ref[...]                                                  # [P, N]
  acc = lax.dot_general(c_ref[...].astype(state.dtype), state, _RHS_T,
                        preferred_element_type=F32)                       # [Q, P]
  acc = acc * jnp.exp(cs_col)
  scores = cb_ref[...].astype(F32) * _causal_decay(cs_col, cs_row_ref[...])
  scores = scores * dt_ref[...]                                           # [Q, Q] * [1, Q]
  x = x_ref[...]                                                          # [Q, P]
  acc = acc + jnp.dot(scores.astype(x.dtype), x, preferred_element_type=F32)
  if with_d:
    acc = acc + d_ref[...] * x.astype(F32)                                # d: [1, P]
  y_ref[...] = acc.astype(y_ref.dtype)


def chunk_scan_fwd(x, dt, cs, cb, c, states, d, *, chunk_len: int, interpret=None, **_):
  """y [B, T, H, P] in x.dtype from x, dt/cs [B, H, T], cb [B, C, G, Q, Q], C, the states
  entering each chunk [B, C, H, P, N] and D [H, P] (or None). Grid (B, H, C), parallel."""
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      x, c, chunk_len)
  t5 = _tile(3)
  per_head = lambda b, h, k: (b, h, k, 0, 0)
  in_specs = [t5((q, head_dim), per_head), t5((1, q), per_head), t5((q, 1), per_head),
              t5((1, q), per_head),
              t5((q, q), lambda b, h, k: (b, k, lax.div(h, hg), 0, 0)),
              t5((q, d_state), lambda b, h, k: (b, lax.div(h, hg), k, 0, 0)),
              t5((head_dim, d_state), lambda b, h, k: (b, k, h, 0, 0))]
  args = [by_chunk(x, q), rows(dt, q), cols(cs, q), rows(cs, q), cb, by_chunk(c, q), states]
  if d is not None:
    in_specs.append(_tile(1)((1, head_dim), lambda b, h, k: (h, 0, 0)))
    args.append(d.reshape(n_heads, 1, head_dim))
  y = _call(
      functools.partial(_chunk_scan_fwd_kernel, with_d=d is not None),
      grid=(batch, n_heads, n_chunks), in_specs=in_specs,
      out_specs=t5((q, head_dim), per_head),
      out_shape=jax.ShapeDtypeStruct((batch, n_heads, n_chunks, q, head_dim), x.dtype),
      semantics=(PARALLEL, PARALLEL, PARALLEL), name="ssd_tpu_chunk_scan_fwd",
      interpret=interpret)(*args)
  return unchunk(y)


# ------------------------------------------------------------------------------------
# chunk_scan_bwd_dx


def _chunk_scan_bwd_dx_kernel(dy_ref, x_ref, dt_ref, cs_col_ref, cs_row_ref, cs_last_ref,
                              cbt_ref, b_ref, dstate_ref, *rest, with_d):
  if with_d:
    d_ref, dx_ref, ddt_ref = rest
  else:
    dx_ref, ddt_ref = rest
  cs_s = cs_col_ref[...]                                                  # [Q, 1] (rows: s)
  # Through the state leaving the chunk: exp(cs_last - cs_s) B_s dstate^T.
  dstate = dstate_ref[...]                                                # [P, N]
  acc = lax.dot_general(b_ref[...].astype(dstate.dtype), dstate, _RHS_T,
                        preferred_element_type=F32)                       # [Q, P]
  acc = acc * jnp.exp(cs_last_ref[...] - cs_s)
  # scores^T[s, l] = CB[l, s] exp(cs_l - cs_s) for l >= s: the transposed causal tile.
  q = cs_s.shape[0]
  s_idx = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  l_idx = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  decay_t = jnp.exp(jnp.where(l_idx >= s_idx, cs_row_ref[...] - cs_s, -jnp.inf))
  scores_t = cbt_ref[...].astype(F32) * decay_t                           # [Q(s), Q(l)]
  dy = dy_ref[...]                                                        # [Q, P]
  acc = acc + jnp.dot(scores_t.astype(dy.dtype), dy, preferred_element_type=F32)
  ddt_ref[...] = jnp.sum(acc * x_ref[...].astype(F32), axis=1, keepdims=True)   # [Q, 1]
  dx = acc * dt_ref[...]                                                  # dt: [Q, 1]
  if with_d:
    dx = dx + d_ref[...] * dy.astype(F32)
  dx_ref[...] = dx.astype(dx_ref.dtype)


def chunk_scan_bwd_dx(dy, x, dt, cs, cb, b, dstates, d, *, chunk_len: int, interpret=None,
                      **_):
  """dx [B, T, H, P] (x.dtype) and the direct d(dt) [B, H, T] f32 (the part not through cs).
  dstates [B, C, H, P, N]: gradient of the state leaving each chunk. Grid (B, H, C)."""
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      x, b, chunk_len)
  t5 = _tile(3)
  per_head = lambda bb, h, k: (bb, h, k, 0, 0)
  cs_last = cs.reshape(batch, n_heads, n_chunks, q)[..., -1:, None]      # [B, H, C, 1, 1]
  in_specs = [t5((q, head_dim), per_head), t5((q, head_dim), per_head),
              t5((q, 1), per_head), t5((q, 1), per_head), t5((1, q), per_head),
              t5((1, 1), per_head),
              t5((q, q), lambda bb, h, k: (bb, k, lax.div(h, hg), 0, 0)),
              t5((q, d_state), lambda bb, h, k: (bb, lax.div(h, hg), k, 0, 0)),
              t5((head_dim, d_state), lambda bb, h, k: (bb, k, h, 0, 0))]
  args = [by_chunk(dy, q), by_chunk(x, q), cols(dt, q), cols(cs, q), rows(cs, q), cs_last,
          jnp.swapaxes(cb, -1, -2), by_chunk(b, q), dstates]
  if d is not None:
    in_specs.append(_tile(1)((1, head_dim), lambda bb, h, k: (h, 0, 0)))
    args.append(d.reshape(n_heads, 1, head_dim))
  dx, ddt = _call(
      functools.partial(_chunk_scan_bwd_dx_kernel, with_d=d is not None),
      grid=(batch, n_heads, n_chunks), in_specs=in_specs,
      out_specs=[t5((q, head_dim), per_head), t5((q, 1), per_head)],
      out_shape=[jax.ShapeDtypeStruct((batch, n_heads, n_chunks, q, head_dim), x.dtype),
                 jax.ShapeDtypeStruct((batch, n_heads, n_chunks, q, 1), F32)],
      semantics=(PARALLEL, PARALLEL, PARALLEL), name="ssd_tpu_chunk_scan_bwd_dx",
      interpret=interpret)(*args)
  return unchunk(dx), ddt.reshape(batch, n_heads, seqlen)


# ------------------------------------------------------------------------------------
# chunk_dcb


def _chunk_dcb_kernel(dy_ref, x_ref, dt_ref, cs_col_ref, cs_row_ref, cb_ref,
                      dcb_ref, erow_ref, ecol_ref):
  j = pl.program_id(3)
  dm = lax.dot_general(dy_ref[...], x_ref[...], _RHS_T,
                       preferred_element_type=F32)                        # dy_l . x_s [Q, Q]
  grad = dm * _causal_decay(cs_col_ref[...], cs_row_ref[...]) * dt_ref[...]
  e = grad * cb_ref[...].astype(F32)
  erow_ref[...] = jnp.sum(e, axis=1, keepdims=True)                       # [Q, 1]
  ecol_ref[...] = jnp.sum(e, axis=0, keepdims=True)                       # [1, Q]

  @pl.when(j == 0)
  def _():
    dcb_ref[...] = jnp.zeros(dcb_ref.shape, F32)

  dcb_ref[...] += grad


def chunk_dcb(dy, x, dt, cs, cb, *, chunk_len: int, n_groups: int, interpret=None, **_):
  """Gradient of CB summed over the heads of each group, and the per-head sums of
  E = dCB_h * CB over source steps (erow) and over target steps (ecol).

  Grid (B, C, G, heads of the group); the head axis is sequential and accumulates dCB in
  the resident output tile. Returns dcb [B, C, G, Q, Q] f32, erow and ecol [B, H, 1, T].
  """
  batch, seqlen, n_heads, head_dim = x.shape
  q = chunk_len
  n_chunks = seqlen // q
  hg = n_heads // n_groups
  t5 = _tile(3)
  per_head = lambda b, k, g, j: (b, g * hg + j, k, 0, 0)
  in_specs = [t5((q, head_dim), per_head), t5((q, head_dim), per_head),
              t5((1, q), per_head), t5((q, 1), per_head), t5((1, q), per_head),
              t5((q, q), lambda b, k, g, j: (b, k, g, 0, 0))]
  out_specs = [t5((q, q), lambda b, k, g, j: (b, k, g, 0, 0)),
               t5((q, 1), per_head), t5((1, q), per_head)]
  out_shape = [jax.ShapeDtypeStruct((batch, n_chunks, n_groups, q, q), F32),
               jax.ShapeDtypeStruct((batch, n_heads, n_chunks, q, 1), F32),
               jax.ShapeDtypeStruct((batch, n_heads, n_chunks, 1, q), F32)]
  dcb, erow, ecol = _call(
      _chunk_dcb_kernel, grid=(batch, n_chunks, n_groups, hg), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape,
      semantics=(PARALLEL, PARALLEL, PARALLEL, ARBITRARY), name="ssd_tpu_chunk_dcb",
      interpret=interpret,
  )(by_chunk(dy, q), by_chunk(x, q), rows(dt, q), cols(cs, q), rows(cs, q), cb)
  return (dcb, erow.reshape(batch, n_heads, 1, seqlen),
          ecol.reshape(batch, n_heads, 1, seqlen))


# ------------------------------------------------------------------------------------
# head_contract


def _head_contract_kernel(u_ref, w_ref, s_ref, v_ref, acc_ref, r_ref):
  j = pl.program_id(3)
  s = s_ref[...]                                                          # [P, N]
  uw = (u_ref[...].astype(F32) * w_ref[...]).astype(s.dtype)             # w: [Q, 1]
  t = jnp.dot(uw, s, preferred_element_type=F32)                          # [Q, N]
  r_ref[...] = jnp.sum(t * v_ref[...].astype(F32), axis=1, keepdims=True)   # [Q, 1]

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  acc_ref[...] += t


def head_contract(u, w, s, v, *, chunk_len: int, interpret=None, **_):
  """acc[t, g] = sum over heads h of group g of (w_h[t] u_h[t]) @ S_h[chunk of t], and the
  per-head epilogue r_h[t] = v[t, g] . ((w_h[t] u_h[t]) @ S_h).

  u [B, T, H, P], w [B, H, T] f32, s [B, C, H, P, N] (f32 or u's dtype), v [B, T, G, N].
  Grid (B, C, G, heads of the group), the head axis sequential (accumulating in the
  output tile). Returns acc [B, T, G, N] f32 and r [B, H, T] f32.
  """
  batch, seqlen, n_heads, head_dim, n_groups, d_state, q, n_chunks, hg = dims(
      u, v, chunk_len)
  t5 = _tile(3)
  per_head = lambda b, k, g, j: (b, g * hg + j, k, 0, 0)
  per_group = lambda b, k, g, j: (b, g, k, 0, 0)
  acc, r = _call(
      _head_contract_kernel, grid=(batch, n_chunks, n_groups, hg),
      in_specs=[t5((q, head_dim), per_head), t5((q, 1), per_head),
                t5((head_dim, d_state), lambda b, k, g, j: (b, k, g * hg + j, 0, 0)),
                t5((q, d_state), per_group)],
      out_specs=[t5((q, d_state), per_group), t5((q, 1), per_head)],
      out_shape=[jax.ShapeDtypeStruct((batch, n_groups, n_chunks, q, d_state), F32),
                 jax.ShapeDtypeStruct((batch, n_heads, n_chunks, q, 1), F32)],
      semantics=(PARALLEL, PARALLEL, PARALLEL, ARBITRARY), name="ssd_tpu_head_contract",
      interpret=interpret,
  )(by_chunk(u, q), cols(w, q), s, by_chunk(v, q))
  return unchunk(acc), r.reshape(batch, n_heads, seqlen)
