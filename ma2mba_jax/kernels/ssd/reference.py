"""Pure-JAX chunked SSD (the `xla` backend): readable, f32 math, differentiable by autodiff.

The sequence is cut into chunks of Q steps. Within a chunk the scan is a masked
(attention-like) matrix product; across chunks a short recurrence carries the [H, P, N]
state. Every exponent is a sum of non-positive terms dt*A (dt >= 0, A < 0), computed by a
cumulative sum of the terms themselves, never as a difference of two cumulative sums
(which would lose precision and can be positive).

With `reset` (packed segments), every decay factor is also masked by a segment test on
seg, the per-row count of resets restarted at each chunk (seg_l = resets in the chunk at
or before step l): step s reaches l >= s iff seg_l == seg_s; s reaches the chunk's end iff
seg_s == seg_last; the state entering the chunk reaches l iff seg_l == 0 and leaves the
chunk iff seg_last == 0.

Letters: b batch, c chunk, l/s target/source step in a chunk, h head, p head dim, n state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def segsum(a: Array) -> Array:
  """a [..., Q] -> [..., Q, Q]: out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above.

  Built from a masked cumulative sum of the terms, so exp(out) never exceeds 1 for a <= 0.
  """
  q = a.shape[-1]
  terms = jnp.broadcast_to(a[..., :, None], a.shape + (q,))        # [..., k, j] = a[k]
  terms = jnp.where(jnp.tril(jnp.ones((q, q), bool), k=-1), terms, 0.0)  # keep k > j
  sums = jnp.cumsum(terms, axis=-2)                                 # [..., i, j]
  return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def suffix_sum_exclusive(a: Array) -> Array:
  """a [..., Q] -> [..., Q]: out[l] = a[l+1] + ... + a[Q-1] (0 at the last step)."""
  rev = jnp.cumsum(a[..., ::-1], axis=-1)[..., ::-1]  # a[l] + ... + a[Q-1]
  return jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)


def _pad_time(a: Array, pad: int) -> Array:
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[1] = (0, pad)
  return jnp.pad(a, widths)


def ssd_chunked(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array | None,
                initial_state: Array | None, *, chunk_len: int,
                reset: Array | None = None) -> tuple[Array, Array]:
  """Chunked SSD core. Shapes as in registry.py; dt already processed (>= 0, f32);
  reset [B, T] bool or None."""
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = B.shape[2:]
  out_dtype = x.dtype
  f32 = jnp.float32

  # Padding with dt = 0 and x = 0 leaves the state untouched (decay exp(0) = 1, no input).
  pad = (-seqlen) % chunk_len
  n_chunks = (seqlen + pad) // chunk_len
  heads_per_group = n_heads // n_groups

  def chunks(a: Array) -> Array:  # [b, T, ...] -> [b, c, Q, ...] in f32
    a = _pad_time(a.astype(f32), pad)
    return a.reshape((batch, n_chunks, chunk_len) + a.shape[2:])

  xc = chunks(x)                                                    # [b, c, Q, h, p]
  dtc = chunks(dt)                                                  # [b, c, Q, h]
  # Head h reads group h // heads_per_group.
  Bc = jnp.repeat(chunks(B), heads_per_group, axis=3)               # [b, c, Q, h, n]
  Cc = jnp.repeat(chunks(C), heads_per_group, axis=3)               # [b, c, Q, h, n]

  dA = jnp.moveaxis(dtc * A, 3, 1)                                  # [b, h, c, Q], <= 0
  dA_cumsum = jnp.cumsum(dA, axis=-1)                               # [b, h, c, Q]
  dtx = xc * dtc[..., None]                                         # [b, c, Q, h, p]

  decay_in_chunk = jnp.exp(segsum(dA))                              # [b, h, c, l, s]
  decay_to_end = jnp.exp(suffix_sum_exclusive(dA))                  # [b, h, c, Q]
  chunk_decay = jnp.exp(dA_cumsum[..., -1])                         # [b, h, c]
  decay_from_start = jnp.exp(dA_cumsum)                             # [b, h, c, Q]
  if reset is not None:
    # Padding steps start no segment.
    seg = jnp.cumsum(_pad_time(reset.astype(jnp.int32), pad).reshape(
        batch, n_chunks, chunk_len), axis=-1)                       # [b, c, Q]
    same_segment = seg[..., :, None] == seg[..., None, :]           # [b, c, l, s]
    decay_in_chunk = jnp.where(same_segment[:, None], decay_in_chunk, 0.0)
    decay_to_end = jnp.where((seg == seg[..., -1:])[:, None], decay_to_end, 0.0)
    chunk_decay = jnp.where((seg[..., -1] == 0)[:, None], chunk_decay, 0.0)
    decay_from_start = jnp.where((seg == 0)[:, None], decay_from_start, 0.0)

  # 1. Within each chunk: y_l += sum_{s<=l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) dt_s x_s.
  scores = jnp.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay_in_chunk
  y_diag = jnp.einsum("bhcls,bcshp->bclhp", scores, dtx)

  # 2. Each chunk's own contribution to the state at its end.
  chunk_states = jnp.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay_to_end, dtx)

  # 3. Carry the state across chunks: state entering chunk c+1.
  if initial_state is None:
    initial_state = jnp.zeros((batch, n_heads, head_dim, d_state), f32)

  def carry_state(state, inputs):
    decay, new_state = inputs                                       # [b, h], [b, h, p, n]
    return decay[:, :, None, None] * state + new_state, state

  final_state, states_in = jax.lax.scan(
      carry_state, initial_state.astype(f32),
      (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_states, 1, 0)))
  states_in = jnp.moveaxis(states_in, 0, 1)                         # [b, c, h, p, n]

  # 4. The carried state's contribution: y_l += exp(dA_0 + ... + dA_l) C_l . state_in.
  y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states_in, decay_from_start)

  y = y_diag + y_off
  if D is not None:
    y = y + xc * D
  y = y.reshape(batch, n_chunks * chunk_len, n_heads, head_dim)[:, :seqlen]
  return y.astype(out_dtype), final_state
