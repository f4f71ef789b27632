"""Random video frames for the inference benchmarks, made in memory (no video file): a few
distinct batches made once per shape and cycled, so that a timed prefill holds no host work
per frame. No absl flags here (bench/infer.py defines its own; tests import this)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np


@functools.cache
def frame_pool(m: int, size: int, seed: int = 0) -> tuple[np.ndarray, ...]:
  """Four random uint8 [m, S, S, 3] batches (read-only), made once per (m, S, seed): making
  them takes the host 0.4-0.6 s at M = 64, S = 336 (2-core CPU), which a prefill timed
  from its first frame must not include (the GPU would idle meanwhile; a real video is
  decoded by a background thread while the device works)."""
  rng = np.random.default_rng(seed)
  pool = tuple(rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8) for _ in range(4))
  for batch in pool:
    batch.flags.writeable = False
  return pool


def frame_batches(total: int, m: int, size: int, seed: int = 0) -> Iterator[np.ndarray]:
  """`total` random frames as uint8 [m, S, S, 3] batches (the last may be shorter), cycling
  through `frame_pool`'s batches so the host does no per-frame work."""
  pool = frame_pool(m, size, seed)
  for i, start in enumerate(range(0, total, m)):
    yield pool[i % len(pool)][:min(m, total - start)]
