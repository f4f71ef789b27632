"""What every kernel backend's wrappers share: the sizes read off the operands and the block
sizes fitted to them.

Letters: B batch, T time, H heads, P head dim, N state, G groups, C chunks, Q chunk len.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class Dims(NamedTuple):
  """The sizes of one kernel call, read from a per-head operand and a per-group one."""
  batch: int            # B
  seqlen: int           # T (a multiple of Q: the glue pads it)
  n_heads: int          # H
  head_dim: int         # P
  n_groups: int         # G
  d_state: int          # N
  chunk_len: int        # Q
  n_chunks: int         # C = T / Q
  heads_per_group: int  # H / G (head h reads group h // (H / G))


def dims(per_head: jax.Array, per_group: jax.Array, chunk_len: int) -> Dims:
  """Sizes from per_head [B, T, H, P] (x, dy or u) and per_group [B, T, G, N] (B, C or v)."""
  batch, seqlen, n_heads, head_dim = per_head.shape
  n_groups, d_state = per_group.shape[2:]
  return Dims(batch, seqlen, n_heads, head_dim, n_groups, d_state, chunk_len,
              seqlen // chunk_len, n_heads // n_groups)


def largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of n that is at most `at_most` (heads per program, inner steps)."""
  return max(d for d in range(1, min(at_most, n) + 1) if n % d == 0)


def check_block(backend: str, name: str, block: int, full: int) -> int:
  """A block size is an upper bound: the largest divisor of `full` not above it."""
  if block < 1:
    raise ValueError(f"ssd {backend}: {name}={block} must be positive")
  return largest_divisor(full, block)
