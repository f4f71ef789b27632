"""The chunked SSD around six kernels, with its backward pass (`jax.custom_vjp`).

Shared by the `pallas`, `triton` and `tpu` backends: each provides the same six kernels
(`pallas/kernels.py`, `triton/kernels.py`, `tpu/kernels.py`) and `make_core` (or `run`,
for a backend that resolves its own options) turns them into a backend core (contract in
registry.py). The glue between kernels is jnp: padding, the within-chunk
cumulative sum of dt*A, CB = C.B^T per chunk (one batched matmul per group), and the
reductions that turn per-step partial gradients into d(dt) and dA.

Per head, with cs the within-chunk cumulative sum of a = dt*A (cs <= 0, decreasing),
W[l, s] = exp(cs_l - cs_s) for l >= s (else 0), H_c the state entering chunk c:

    y_l     = sum_{s<=l} CB[l,s] W[l,s] dt_s x_s + exp(cs_l) H_c C_l + D x_l
    H_{c+1} = exp(cs_last) H_c + sum_s exp(cs_last - cs_s) dt_s x_s B_s^T

Memory: the forward saves only its inputs and the chunk states H_c ([B, C, H, P, N], T/Q
states per head, kept in x's dtype: bf16 for bf16 inputs), so a layer's residuals and the
backward's temporaries grow linearly in T. Everything else (cs, CB, the intra-chunk
scores) is recomputed. The recurrences themselves always accumulate in f32.

Backward (dy, dH_final given), per head:
    dH_c    = exp(cs_last) dH_{c+1} + sum_l exp(cs_l) dy_l C_l^T     (reverse state scan)
    dx_s    = dt_s [sum_{l>=s} CB W dy_l + exp(cs_last - cs_s) dH_{c+1} B_s] + D dy_s
    dC_l    = sum_{s<=l} dG[l,s] B_s + exp(cs_l) H_c^T dy_l             dG = (dy x^T) W dt_s
    dB_s    = sum_{l>=s} dG[l,s] C_l + exp(cs_last - cs_s) dt_s dH_{c+1}^T x_s
    d(cs)   from W (E = dG * CB: +row sums, -column sums), from exp(cs_l) in y (off-chunk
            term), from the decays of the state update; d(dt) and dA then follow from
            cs = cumsum(dt*A) by a reverse cumulative sum.
dB and dC sum over the heads of a group: kernels that loop over a block of a group's heads
(chunk_dcb, head_contract) do that sum in registers and write one partial sum per block,
never per-head copies.

Segment resets (`reset` [B, T], packed segments) need no kernel change: with seg the
per-row count of resets restarted at each chunk (seg_l = resets in the chunk at or before
l), every decay the kernels see is masked in the glue before they run:
    W[l, s]          via CB[l, s] := 0 unless seg_l == seg_s (dCB is masked the same way)
    exp(cs_l) H_c    via C_l := 0 in chunk_scan_fwd and exp(cs_l) := 0 in the backward
                     unless seg_l == 0 (the carried state reaches only steps before the
                     chunk's first reset)
    exp(cs_last - cs_s)  via w_s := 0 and, in chunk_scan_bwd_dx, B_s := 0 unless
                     seg_s == seg_last (only the last segment's steps reach the chunk end)
    exp(cs_last)     := 0 if the chunk has a reset (the carry does not cross it)
The masks are constants, so every formula above keeps its form; with reset=None none of
this runs (a Python branch) and the kernels see exactly what they saw before.

Letters: B batch, T time, H heads, P head dim, N state, G groups, C chunks, Q chunk len.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Options:
  """Static options of a kernel backend (hashable: they are custom_vjp non-diff args)."""
  # SSD chunk length Q.
  chunk_len: int
  # Run the kernels with the Pallas interpreter (CPU tests); ignored by `triton`.
  interpret: bool = False
  # How the chunk states are computed: "split" (parallel chunk_state, then the memory-bound
  # state_pass) or "fused" (one sequential state_scan kernel; version 1).
  state_impl: str = "split"
  # chunk_state (and state_scan): head-dim rows per program.
  block_p: int = 64
  # state_pass: state elements (of P*N) per program.
  block_s: int = 1024
  # chunk_scan_fwd, chunk_scan_bwd_dx, chunk_dcb: rows (and columns) of intra-chunk tiles.
  block_l: int = 64
  # head_contract: time steps per program.
  block_r: int = 64
  # Heads of a group per program in head_contract and chunk_dcb.
  contract_heads: int = 8
  dcb_heads: int = 20
  # Keep the saved chunk states, their gradients and CB in f32 even for bf16 inputs.
  state_f32: bool = False
  cb_f32: bool = False
  # Warps per program of each kernel, and software-pipelining depth.
  warps_state: int = 8
  warps_pass: int = 4
  warps_chunk: int = 4
  warps_dcb: int = 8
  warps_contract: int = 8
  num_stages: int = 2
  # chunk_scan_fwd's pipelining depth (None: num_stages). Apart from the backward's
  # chunk_scan_bwd_dx, which shares its blocks and warps: a backend tunes them separately.
  stages_chunk_fwd: int | None = None

  def kernel_args(self, kind: str) -> dict[str, Any]:
    args = {"state": {"block_p": self.block_p, "num_warps": self.warps_state},
            "fused": {"block_p": self.block_p, "num_warps": self.warps_state},
            "pass": {"block_s": self.block_s, "num_warps": self.warps_pass},
            "chunk": {"block_l": self.block_l, "num_warps": self.warps_chunk},
            "chunk_fwd": {"block_l": self.block_l, "num_warps": self.warps_chunk},
            "dcb": {"block_l": self.block_l, "heads": self.dcb_heads,
                    "num_warps": self.warps_dcb},
            "contract": {"block_r": self.block_r, "heads": self.contract_heads,
                         "num_warps": self.warps_contract}}[kind]
    stages = self.stages_chunk_fwd if kind == "chunk_fwd" else None
    args.update(num_stages=self.num_stages if stages is None else stages,
                interpret=self.interpret)
    if kind != "pass":
      args["chunk_len"] = self.chunk_len
    return args


def _pad_time(a: jax.Array, pad: int) -> jax.Array:
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[1] = (0, pad)
  return jnp.pad(a, widths)


def decays(dt: jax.Array, A: jax.Array, chunk_len: int):
  """dt [B, T, H] (padded) -> dt_t [B, H, T], cs [B, H, T], cs_last [B, H, C], all f32."""
  batch, seqlen, n_heads = dt.shape
  n_chunks = seqlen // chunk_len
  dt_t = jnp.transpose(dt, (0, 2, 1))
  a = (dt_t * A[None, :, None]).reshape(batch, n_heads, n_chunks, chunk_len)
  cs = jnp.cumsum(a, axis=-1)
  return dt_t, cs.reshape(batch, n_heads, seqlen), cs[..., -1]


def _per_chunk(a: jax.Array, chunk_len: int) -> jax.Array:
  """[B, T, ...] -> [B, C, Q, ...]."""
  return a.reshape((a.shape[0], a.shape[1] // chunk_len, chunk_len) + a.shape[2:])


def chunk_cb(c: jax.Array, b: jax.Array, chunk_len: int, dtype=F32) -> jax.Array:
  """CB[b, c, g, l, s] = C_l . B_s within each chunk: [B, C, G, Q, Q] (f32 sums)."""
  cb = jnp.einsum("bclgn,bcsgn->bcgls", _per_chunk(c, chunk_len), _per_chunk(b, chunk_len),
                  preferred_element_type=F32)
  return cb.astype(dtype)


def storage_dtypes(x, opts: Options):
  """(state dtype, CB dtype): x's dtype unless f32 is asked for."""
  return (F32 if opts.state_f32 else x.dtype), (F32 if opts.cb_f32 else x.dtype)


def state_weights(dt_t, cs, cs_last, chunk_len):
  """dt_s * exp(cs_last - cs_s): the weight of step s in its chunk's state update."""
  batch, n_heads, seqlen = cs.shape
  to_end = cs_last[..., None] - cs.reshape(batch, n_heads, -1, chunk_len)
  return dt_t * jnp.exp(to_end).reshape(batch, n_heads, seqlen)


def _states(kernels, opts: Options, u, v, w, decay, init, other=None, *, reverse: bool,
            out_dtype):
  """The carry before each chunk (in scan order), the final carry, and with `other` the
  partial sums of carry * other per chunk: chunk_state + state_pass, or state_scan."""
  if opts.state_impl == "fused":
    return kernels.state_scan(u, v, w, decay, init, other, reverse=reverse, out_dtype=out_dtype,
                              **opts.kernel_args("fused"))
  inc = kernels.chunk_state(u, v, w, **opts.kernel_args("state"))
  return kernels.state_pass(inc, decay, init, other, reverse=reverse, out_dtype=out_dtype,
                            **opts.kernel_args("pass"))


def _segment_masks(reset: jax.Array, chunk_len: int):
  """reset [B, T] bool (padded) -> (same [B, C, Q, Q]: l and s in one segment; from_start
  [B, T]: no reset in the chunk at or before the step; to_end [B, T]: no reset in the chunk
  after the step; crosses [B, C]: no reset in the chunk), all bool."""
  batch, seqlen = reset.shape
  seg = jnp.cumsum(reset.astype(jnp.int32).reshape(batch, -1, chunk_len), axis=-1)
  same = seg[..., :, None] == seg[..., None, :]
  return (same, (seg == 0).reshape(batch, seqlen),
          (seg == seg[..., -1:]).reshape(batch, seqlen), seg[..., -1] == 0)


def _masked(a: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Zeros a where mask is False; mask's axes are a's leading axes with `axis` inserted."""
  mask = jnp.expand_dims(mask, axis)
  mask = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
  return jnp.where(mask, a, jnp.zeros((), a.dtype))


def _check_options(opts: Options, backend: str) -> None:
  if opts.state_impl not in ("split", "fused"):
    raise ValueError(f"ssd {backend}: state_impl={opts.state_impl!r} must be 'split' or 'fused'")


def _check_shapes(x, B, opts: Options, backend: str) -> None:
  if opts.interpret:
    return
  head_dim, d_state = x.shape[3], B.shape[3]
  for name, v in (("chunk_len", opts.chunk_len), ("head_dim P", head_dim),
                  ("d_state N", d_state)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"ssd {backend}: {name}={v} must be a power of 2 >= 16 for the GPU "
                       f"kernels (use impl='xla' for other shapes)")


def _forward(kernels, opts: Options, x, dt, A, B, C, D, initial_state, reset):
  batch, seqlen, n_heads, head_dim = x.shape
  d_state = B.shape[3]
  q = opts.chunk_len
  pad = (-seqlen) % q
  # Padding with dt = 0, x = 0 leaves the state unchanged (decay 1, no input).
  xp, dtp, Bp, Cp = (_pad_time(a, pad) for a in (x, dt, B, C))
  dt_t, cs, cs_last = decays(dtp, A, q)
  state_dtype, cb_dtype = storage_dtypes(x, opts)
  cb = chunk_cb(Cp, Bp, q, cb_dtype)
  w_state = state_weights(dt_t, cs, cs_last, q)
  decay_chunk = jnp.exp(cs_last)
  c_carried = Cp                 # C where the carried state is read (chunk_scan_fwd)
  if reset is not None:
    same, from_start, to_end, crosses = _segment_masks(_pad_time(reset, pad), q)
    cb = _masked(cb, same, 2)
    w_state = _masked(w_state, to_end, 1)
    decay_chunk = _masked(decay_chunk, crosses, 1)
    c_carried = _masked(Cp, from_start, 2)
  init = (jnp.zeros((batch, n_heads, head_dim, d_state), F32) if initial_state is None
          else initial_state)
  states, final, _ = _states(kernels, opts, xp, Bp, w_state, decay_chunk, init,
                             reverse=False, out_dtype=state_dtype)
  y = kernels.chunk_scan_fwd(xp, dt_t, cs, cb, c_carried, states, D,
                             **opts.kernel_args("chunk_fwd"))
  return y[:, :seqlen], final, states


def _backward(kernels, opts: Options, residuals, cotangents):
  x, dt, A, B, C, D, initial_state, reset, states = residuals
  dy, dfinal = cotangents
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups = B.shape[2]
  q = opts.chunk_len
  pad = (-seqlen) % q
  xp, dtp, Bp, Cp = (_pad_time(a, pad) for a in (x, dt, B, C))
  dyp = _pad_time(dy.astype(x.dtype), pad)
  n_chunks = xp.shape[1] // q
  dt_t, cs, cs_last = decays(dtp, A, q)
  state_dtype, cb_dtype = storage_dtypes(x, opts)
  cb = chunk_cb(Cp, Bp, q, cb_dtype)
  w_state = state_weights(dt_t, cs, cs_last, q)
  exp_cs = jnp.exp(cs)
  decay_chunk = jnp.exp(cs_last)
  b_to_end = Bp                  # B where the state gradient is read (chunk_scan_bwd_dx)
  if reset is not None:          # the forward's masks (see the module docstring)
    same, from_start, to_end, crosses = _segment_masks(_pad_time(reset, pad), q)
    cb = _masked(cb, same, 2)
    w_state = _masked(w_state, to_end, 1)
    exp_cs = _masked(exp_cs, from_start, 1)
    decay_chunk = _masked(decay_chunk, crosses, 1)
    b_to_end = _masked(Bp, to_end, 2)

  # dH_{c+1} for every chunk (the gradient of the state leaving it), d(initial state), and
  # sum(dH_{c+1} * H_c) for the decay of the carried state.
  dstates, d_init, carry_dots = _states(kernels, opts, dyp, Cp, exp_cs, decay_chunk,
                                        dfinal.astype(F32), states, reverse=True,
                                        out_dtype=state_dtype)
  dx, ddt = kernels.chunk_scan_bwd_dx(dyp, xp, dt_t, cs, cb, b_to_end, dstates, D,
                                      **opts.kernel_args("chunk"))
  dcb, erow, ecol = kernels.chunk_dcb(dyp, xp, dt_t, cs, cb, n_groups=n_groups,
                                      **opts.kernel_args("dcb"))
  if reset is not None:
    dcb = _masked(dcb, same, 2)  # the gradient of the unmasked CB
  dc_off, dcs_off = kernels.head_contract(dyp, exp_cs, states, Cp, **opts.kernel_args("contract"))
  db_state, u_state = kernels.head_contract(xp, w_state, dstates, Bp,
                                            **opts.kernel_args("contract"))

  dc = dc_off + jnp.einsum("bcgls,bcsgn->bclgn", dcb, _per_chunk(Bp, q).astype(F32)
                           ).reshape(dc_off.shape)
  db = db_state + jnp.einsum("bcgls,bclgn->bcsgn", dcb, _per_chunk(Cp, q).astype(F32)
                             ).reshape(db_state.shape)

  # d(cs): intra-chunk decays (+rows, -columns of E), the carried state's exp(cs_l) in y,
  # the state update's exp(cs_last - cs_s) (-u at s, +u at the chunk's last step) and the
  # carry's exp(cs_last).
  dcs = jnp.sum(erow, axis=2) - jnp.sum(ecol, axis=2) + dcs_off - u_state
  dcs = dcs.reshape(batch, n_heads, n_chunks, q)
  d_last = jnp.sum(u_state.reshape(batch, n_heads, n_chunks, q), axis=-1)
  d_last = d_last + decay_chunk * jnp.sum(carry_dots, axis=2)
  dcs = dcs.at[..., -1].add(d_last)
  # cs_l = sum_{k<=l} a_k within the chunk, so da_k = sum_{l>=k} dcs_l.
  da = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1)
  dA = jnp.sum(da * dt_t.reshape(da.shape), axis=(0, 2, 3))
  ddt = ddt.reshape(da.shape) + A[None, :, None, None] * da
  ddt = jnp.transpose(ddt.reshape(batch, n_heads, -1), (0, 2, 1))[:, :seqlen]

  dD = None
  if D is not None:
    dD = jnp.einsum("bthp,bthp->hp", dy.astype(F32), x.astype(F32))
  d_init = None if initial_state is None else d_init
  # reset is not differentiable (bool): no cotangent.
  return (dx[:, :seqlen], ddt, dA, db[:, :seqlen].astype(B.dtype),
          dc[:, :seqlen].astype(C.dtype), dD, d_init, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd(kernels, opts, x, dt, A, B, C, D, initial_state, reset):
  y, final, _ = _forward(kernels, opts, x, dt, A, B, C, D, initial_state, reset)
  return y, final


def _ssd_fwd(kernels, opts, x, dt, A, B, C, D, initial_state, reset):
  y, final, states = _forward(kernels, opts, x, dt, A, B, C, D, initial_state, reset)
  return (y, final), (x, dt, A, B, C, D, initial_state, reset, states)


def _ssd_bwd(kernels, opts, residuals, cotangents):
  return _backward(kernels, opts, residuals, cotangents)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def run(kernels, opts: Options, x, dt, A, B, C, D, initial_state, reset):
  """(y [B, T, H, P], final state [B, H, P, N] f32) of the chunked SSD on `kernels` (a
  module with the six kernels), differentiable through the custom_vjp above."""
  return _ssd(kernels, opts, x, dt, A, B, C, D, initial_state, reset)


def make_core(kernels, backend: str, *, default_interpret: bool | None = None,
              defaults: dict[str, Any] | None = None):
  """A registry core (see registry.py) running `kernels` (a module with the six kernels).

  `interpret=None` (the default) runs the Pallas interpreter off GPU; `default_interpret`
  fixes it instead (the triton backend has no interpreter). `defaults`: this backend's own
  Options values (tuned block sizes, warps, stages), under any option the caller passes.
  """
  defaults = dict(defaults or {})

  def core(x, dt, A, B, C, D, initial_state, *, chunk_len: int, interpret: bool | None = None,
           reset: jax.Array | None = None, **options):
    if interpret is None:
      interpret = (default_interpret if default_interpret is not None
                   else jax.default_backend() != "gpu")
    opts = Options(chunk_len=chunk_len, interpret=bool(interpret), **{**defaults, **options})
    _check_options(opts, backend)
    _check_shapes(x, B, opts, backend)
    return _ssd(kernels, opts, x, dt, A, B, C, D, initial_state, reset)

  core.__name__ = f"ssd_{backend}"
  core.__doc__ = (f"SSD core on the {backend} kernels. Options: reset, interpret, "
                  + ", ".join(f.name for f in dataclasses.fields(Options)[2:]) + ".")
  return core
