"""The public SSD entry: input checks, dt preprocessing, D skip, backend dispatch.

Axis letters used in this package: B batch, T time, H heads, P head dim, N state size,
G groups (B and C are shared by the H/G heads of a group), C chunks, Q chunk length.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ma2mba_jax.kernels.ssd import registry

Array = jax.Array


def process_dt(dt: Array, dt_bias: Array | None, dt_softplus: bool,
               dt_limit: tuple[float, float]) -> Array:
  """Raw dt [..., H] -> step sizes in f32: softplus(dt + bias) clipped to dt_limit."""
  dt = dt.astype(jnp.float32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(jnp.float32)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  lo, hi = dt_limit
  if lo > 0.0 or hi != math.inf:
    dt = jnp.clip(dt, lo, hi)
  elif not dt_softplus:
    # Without softplus a raw dt could be negative, which would make exp(dt*A) grow.
    dt = jnp.maximum(dt, 0.0)
  return dt


def _check_float(name: str, a: Any) -> None:
  if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
    raise TypeError(f"ssd: {name} must be a floating-point array, got dtype {jnp.result_type(a)}")


def reset_from_segment_ids(segment_ids: Array) -> Array:
  """segment_ids [B, T] (ints) -> reset [B, T] bool: True where a new segment starts,
  i.e. where segment_ids[t] != segment_ids[t-1]; False at t = 0 (the initial state, if
  any, belongs to the first segment)."""
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.ndim != 2:
    raise ValueError(f"reset_from_segment_ids: segment_ids must be [B, T], got shape "
                     f"{segment_ids.shape}")
  changed = segment_ids[:, 1:] != segment_ids[:, :-1]                  # [B, T-1]
  return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def _check_reset(reset: Any, batch: int, seqlen: int) -> None:
  if getattr(reset, "shape", None) != (batch, seqlen):
    raise ValueError(f"ssd: reset must be [B, T] = {(batch, seqlen)}, got "
                     f"{getattr(reset, 'shape', None)}")
  dtype = jnp.result_type(reset)
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"ssd: reset must be a bool or integer array, got dtype {dtype}")


def _check_inputs(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state, chunk_len) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"ssd: x must be [B, T, H, P], got shape {getattr(x, 'shape', None)}")
  batch, seqlen, n_heads, head_dim = x.shape
  if getattr(dt, "shape", None) != (batch, seqlen, n_heads):
    raise ValueError(f"ssd: dt must be [B, T, H] = {(batch, seqlen, n_heads)} to match x "
                     f"{x.shape}, got {getattr(dt, 'shape', None)}")
  if getattr(A, "shape", None) != (n_heads,):
    raise ValueError(f"ssd: A must be [H] = ({n_heads},), got {getattr(A, 'shape', None)}")
  for name, m in (("B", B), ("C", C)):
    shape = getattr(m, "shape", None)
    if shape is None or len(shape) != 4 or shape[:2] != (batch, seqlen):
      raise ValueError(f"ssd: {name} must be [B, T, G, N] with B, T = {(batch, seqlen)}, "
                       f"got {shape}")
  if B.shape != C.shape:
    raise ValueError(f"ssd: B and C must have the same shape, got {B.shape} and {C.shape}")
  n_groups = B.shape[2]
  if n_groups < 1 or n_heads % n_groups:
    raise ValueError(f"ssd: the number of groups G={n_groups} must divide the number of "
                     f"heads H={n_heads}")
  if D is not None and D.shape not in ((n_heads,), (n_heads, head_dim)):
    raise ValueError(f"ssd: D must be [H] or [H, P] = ({n_heads},) or {(n_heads, head_dim)}, "
                     f"got {D.shape}")
  if dt_bias is not None and dt_bias.shape != (n_heads,):
    raise ValueError(f"ssd: dt_bias must be [H] = ({n_heads},), got {dt_bias.shape}")
  if initial_state is not None and initial_state.shape != (batch, n_heads, head_dim, B.shape[3]):
    raise ValueError(f"ssd: initial_state must be [B, H, P, N] = "
                     f"{(batch, n_heads, head_dim, B.shape[3])}, got {initial_state.shape}")
  for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D),
                  ("dt_bias", dt_bias), ("initial_state", initial_state)):
    if a is not None:
      _check_float(name, a)
  if not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"ssd: chunk_len must be a positive int, got {chunk_len!r}")
  if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1] or dt_limit[0] < 0:
    raise ValueError(f"ssd: dt_limit must be (lo, hi) with 0 <= lo <= hi, got {dt_limit!r}")


def ssd(x: Array, dt: Array, A: Array, B: Array, C: Array, *,
        D: Array | None = None, dt_bias: Array | None = None, dt_softplus: bool = True,
        dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Array | None = None,
        chunk_len: int = 256, impl: str = "auto", reset: Array | None = None,
        **backend_options) -> tuple[Array, Array]:
  """Selective state space scan of Mamba-2 (SSD), per head h and time t:

      dt_t = clip(softplus(dt_raw_t + dt_bias), *dt_limit)
      h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T       h_t: [P, N]
      y_t  = h_t C_t + D * x_t

  With `reset`, the decay is 0 where reset_t is set (the state restarts before step t):
  step i reaches step j >= i iff there is no reset in (i, j]; the initial state reaches
  step t iff there is no reset in [0, t]; final_state holds what reaches step T-1. So a
  caller that splits T into blocks, slices `reset` the same way and passes each block's
  final state to the next gets the unsplit result.

  Args:
    x: [B, T, H, P] inputs (bf16 or f32); math accumulates in f32.
    dt: [B, T, H] raw step sizes (bias, softplus and limit are applied here).
    A: [H] negative decay rates (A = -exp(A_log)).
    B, C: [B, T, G, N] input and output projections; G must divide H.
    D: [H] or [H, P] skip connection, optional.
    dt_bias: [H], optional.
    initial_state: [B, H, P, N] state before the first step (zeros if None).
    chunk_len: SSD chunk length Q; any T is accepted.
    impl: "auto" | "xla" | "pallas" | "triton" | "tpu" | "mosaic_gpu" (see registry.py).
    reset: [B, T] bool or int (nonzero = True), optional: True at the first step of each
      packed segment (see `reset_from_segment_ids`). None (the default) costs nothing.
    **backend_options: passed to the backend (e.g. interpret=True, block sizes).

  Returns:
    y: [B, T, H, P] in x.dtype, and final_state: [B, H, P, N] in f32.
  """
  _check_inputs(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state, chunk_len)
  if reset is not None:
    _check_reset(reset, *x.shape[:2])
    reset = reset if jnp.result_type(reset) == jnp.bool_ else reset != 0
    # Backends take `reset` only when it is given: reset=None calls them exactly as before.
    backend_options["reset"] = reset
  n_heads, head_dim = x.shape[2:]
  dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
  if D is not None:
    D = jnp.broadcast_to(D.astype(jnp.float32).reshape(n_heads, -1), (n_heads, head_dim))
  if initial_state is not None:
    initial_state = initial_state.astype(jnp.float32)
  core = registry.get_backend(registry.resolve_impl(impl))
  return core(x, dt, A.astype(jnp.float32), B, C, D, initial_state, chunk_len=chunk_len,
              **backend_options)
