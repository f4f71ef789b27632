"""Sequence-parallel SSD: one sequence split over the devices of a mesh axis.

Each device holds a contiguous piece of T and runs the ordinary scan on it from a zero
state. The pieces are then stitched exactly: the state entering piece d is

    h_in[d] = exp(a[d-1]) h_in[d-1] + h_loc[d-1],      h_in[0] = initial_state

where a[e] = sum over piece e of dt*A (<= 0) and h_loc[e] its final state from zero; this
short scan over devices runs on every device after an all_gather of the (a, h_loc) pairs
([n, B, H] and [n, B, H, P, N]: a few MB, whatever T is). Each device then adds what the
entering state contributes to its outputs: y_t += exp(dA_1 + ... + dA_t) C_t . h_in.
Gradients follow by autodiff through shard_map and all_gather (whose transpose is a
reduce-scatter), so the backward passes d(state) between devices the same way.

With `reset` (split along T like x), each local scan restarts at its piece's resets, a
piece with any reset passes on only its own final state (its decay factor exp(a[e]) is
replaced by 0), and the entering state reaches only the piece's steps before its first
reset (the correction is masked there).

Inside a shard_map that already splits T over an axis (the trainer's `seq` mesh axis), the
model reaches the same stitching through a context instead of a nested shard_map:

    with sequence_axis("seq", n):          # set by train/step.py around the model call
      ssd_in_context(...)                  # the stitched SSD on this device's piece
      conv_state_in_context(xBC, ...)      # the K-1 inputs before the piece (a halo)

Outside the context both are the ordinary one-device functions. The context is read while
JAX traces; a function traced under it must not be reused (through a JAX cache keyed on
the Python function) by a trace outside it: the model builds its scans, cells and
checkpoints from fresh closures per call, so nothing is shared.

Letters: B batch, T time (split over the axis), H heads, P head dim, N state, G groups,
C conv channels, K conv kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ma2mba_jax.kernels.ssd.api import process_dt, ssd

_CONTEXT = threading.local()


@contextlib.contextmanager
def sequence_axis(axis: str, n: int):
  """Within it (inside a shard_map whose `axis`, of size n, splits T), `ssd_in_context` and
  `conv_state_in_context` work on this device's piece of every sequence."""
  previous = getattr(_CONTEXT, "axis", None)
  _CONTEXT.axis = (axis, n) if n > 1 else None
  try:
    yield
  finally:
    _CONTEXT.axis = previous


def _zeros_for_missing(x, B, initial_state, D, dt_bias):
  """Zeros for the optional inputs left out: initial state [b, H, P, N] f32, D and dt_bias
  [H] f32 (the stitched SSD takes them all)."""
  batch, _, n_heads, head_dim = x.shape
  if initial_state is None:
    initial_state = jnp.zeros((batch, n_heads, head_dim, B.shape[3]), jnp.float32)
  if D is None:
    D = jnp.zeros((n_heads,), jnp.float32)
  if dt_bias is None:
    dt_bias = jnp.zeros((n_heads,), jnp.float32)
  return initial_state, D, dt_bias


def current_axis() -> tuple[str, int] | None:
  """(axis name, devices on it) of the enclosing `sequence_axis`, or None."""
  return getattr(_CONTEXT, "axis", None)


def ssd_in_context(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus: bool = True,
                   dt_limit: tuple[float, float] = (0.0, math.inf), initial_state=None,
                   chunk_len: int = 256, impl: str = "auto", reset=None):
  """`ssd()`; inside `sequence_axis`, on this device's piece of T with the states of the
  pieces before it stitched in (initial_state: the whole sequence's, the same on every
  device; final_state: the whole sequence's, on every device)."""
  context = current_axis()
  if context is None:
    return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
               dt_limit=dt_limit, initial_state=initial_state, chunk_len=chunk_len,
               impl=impl, reset=reset)
  axis, n = context
  initial_state, D, dt_bias = _zeros_for_missing(x, B, initial_state, D, dt_bias)
  extra = () if reset is None else (reset,)
  return _stitch(x, dt, A, B, C, D, dt_bias, initial_state.astype(jnp.float32), *extra,
                 axis=axis, n=n, dt_softplus=dt_softplus, dt_limit=dt_limit,
                 chunk_len=chunk_len, impl=impl)


def conv_state_in_context(xBC, conv_state, reset=None):
  """The causal conv's incoming state [B, C, K-1] for this device's piece xBC [B, t, C]:
  `conv_state` outside `sequence_axis` and on the first device; elsewhere the previous
  piece's last K-1 inputs (a halo, from its device by ppermute), those before its last
  reset zeroed (they reach no later token). The piece must hold at least K-1 tokens."""
  context = current_axis()
  if context is None:
    return conv_state
  axis, n = context
  keep = conv_state.shape[2]
  if keep == 0:
    return conv_state
  if xBC.shape[1] < keep:
    raise ValueError(f"conv_state_in_context: a sequence piece of {xBC.shape[1]} tokens is "
                     f"shorter than the conv's {keep} carried inputs")
  tail = xBC[:, -keep:]                                                    # [B, K-1, C]
  if reset is not None:
    count = jnp.cumsum(reset.astype(jnp.int32), axis=1)                    # [B, t]
    tail = jnp.where((count[:, -keep:] == count[:, -1:])[..., None], tail,
                     jnp.zeros((), tail.dtype))
  halo = jax.lax.ppermute(jnp.swapaxes(tail, 1, 2).astype(conv_state.dtype), axis,
                          [(i, i + 1) for i in range(n - 1)])              # [B, C, K-1]
  first = jax.lax.axis_index(axis) == 0
  return jnp.where(first, conv_state, halo)


def last_piece_state(state):
  """Inside `sequence_axis`: the last device's `state` (a sequence's final conv state), on
  every device; outside it, `state`."""
  context = current_axis()
  if context is None:
    return state
  axis, n = context
  return jax.lax.all_gather(state, axis)[n - 1]


def _stitch(x, dt, A, B, C, D, dt_bias, initial_state, *reset, axis, n, dt_softplus,
            dt_limit, chunk_len, impl):
  """Per-device body: local scan, device-level state scan, correction. `reset` is empty
  or the piece's [B, t] resets."""
  reset = reset[0] if reset else None
  y, h_local = ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                   dt_limit=dt_limit, chunk_len=chunk_len, impl=impl, reset=reset)
  dA = process_dt(dt, dt_bias, dt_softplus, dt_limit) * A.astype(jnp.float32)   # [B, t, H]
  piece_decay = jnp.exp(jnp.sum(dA, axis=1))                                     # [B, H]
  decay_from_start = jnp.exp(jnp.cumsum(dA, axis=1))                            # [B, t, H]
  if reset is not None:
    seen = jnp.cumsum(reset.astype(jnp.int32), axis=1) > 0   # [B, t]: a reset at or before t
    piece_decay = jnp.where(seen[:, -1:], 0.0, piece_decay)
    decay_from_start = jnp.where(seen[..., None], 0.0, decay_from_start)
  all_decay = jax.lax.all_gather(piece_decay, axis)                              # [n, B, H]
  all_states = jax.lax.all_gather(h_local, axis)                                # [n, B, H, P, N]
  entering = []
  h = initial_state
  for e in range(n):  # n is the (static, small) number of devices on the axis
    entering.append(h)
    h = all_decay[e][..., None, None] * h + all_states[e]
  final_state = h
  h_in = jnp.stack(entering)[jax.lax.axis_index(axis)]                          # [B, H, P, N]
  heads_per_group = x.shape[2] // C.shape[2]
  C_heads = jnp.repeat(C.astype(jnp.float32), heads_per_group, axis=2)          # [B, t, H, N]
  y_in = jnp.einsum("bthn,bhpn->bthp", C_heads, h_in) * decay_from_start[..., None]
  return (y.astype(jnp.float32) + y_in).astype(x.dtype), final_state


def ssd_sequence_parallel(x, dt, A, B, C, *, mesh: Mesh, axis: str = "sequence", D=None,
                          dt_bias=None, dt_softplus: bool = True,
                          dt_limit: tuple[float, float] = (0.0, math.inf),
                          initial_state=None, chunk_len: int = 256, impl: str = "auto",
                          reset=None):
  """`ssd()` with x, dt, B, C (and reset [B, T], optional, as in `ssd`) split along T over
  `mesh` axis `axis` (T must divide evenly).

  Returns y [B, T, H, P] (split along T like x) and final_state [B, H, P, N] f32
  (replicated), equal to the single-device `ssd` on the whole sequence.
  """
  n = mesh.shape[axis]
  batch, seqlen = x.shape[:2]
  if seqlen % n:
    raise ValueError(f"ssd_sequence_parallel: T={seqlen} must be a multiple of the "
                     f"{n} devices on mesh axis {axis!r}")
  initial_state, D, dt_bias = _zeros_for_missing(x, B, initial_state, D, dt_bias)
  split_t, whole = P(None, axis), P()
  body = functools.partial(_stitch, axis=axis, n=n, dt_softplus=dt_softplus,
                           dt_limit=dt_limit, chunk_len=chunk_len, impl=impl)
  in_specs = (split_t, split_t, whole, split_t, split_t, whole, whole, whole)
  args = (x, dt, A, B, C, D, dt_bias, initial_state.astype(jnp.float32))
  if reset is not None:
    if getattr(reset, "shape", None) != (batch, seqlen):
      raise ValueError(f"ssd_sequence_parallel: reset must be [B, T] = {(batch, seqlen)}, "
                       f"got {getattr(reset, 'shape', None)}")
    in_specs, args = in_specs + (split_t,), args + (reset,)
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(split_t, whole),
                     check_vma=False)
  return fn(*args)
