"""bench/frames.py, bench.infer's random frames: made once per shape (outside the timed
prefill), cycled, read-only."""

import numpy as np

from ma2mba_jax.bench.frames import frame_batches, frame_pool


def test_frame_batches_cycle_one_cached_read_only_pool():
  batches = list(frame_batches(10, 4, 8, seed=3))
  assert [b.shape for b in batches] == [(4, 8, 8, 3), (4, 8, 8, 3), (2, 8, 8, 3)]
  assert all(b.dtype == np.uint8 and not b.flags.writeable for b in batches)
  pool = frame_pool(4, 8, 3)
  assert frame_pool(4, 8, 3) is pool                     # made once, not per video
  assert all(np.shares_memory(b, p) for b, p in zip(batches, pool))
  assert not np.array_equal(pool[0], pool[1])            # distinct batches
  assert not np.array_equal(frame_pool(4, 8, 4)[0], pool[0])
