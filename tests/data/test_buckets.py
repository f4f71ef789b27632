"""Length buckets (issue 17): without packing, a batch's token arrays are cut to the smallest
bucket that holds its longest row; the cut part was all padding; the shapes seen are
bounded by the number of buckets."""

import grain
import numpy as np
import pytest

from ma2mba_jax.data.batching import PadBatchIterDataset, bucket_ladder
from ma2mba_jax.data.pipeline import data_settings

MAX_TOKENS, IMAGE, K = 128, 4, 2


def _example(i: int, n: int) -> dict:
  rng = np.random.default_rng(i)
  frames = min(n // K, 3)
  vision = np.full(n, -1, np.int32)
  vision[:frames * K] = np.arange(frames * K)
  return {"id": f"ex{i}", "num_dropped": 0,
          "tokens": rng.integers(1, 100, size=n).astype(np.int32),
          "loss_mask": rng.random(n) < 0.5, "vision_index": vision,
          "frames": rng.integers(0, 255, size=(frames, IMAGE, IMAGE, 3)).astype(np.uint8)}


def _batches(lengths, buckets, batch_size=2):
  examples = [_example(i, n) for i, n in enumerate(lengths)]
  ds = PadBatchIterDataset(grain.MapDataset.source(examples).to_iter_dataset(),
                           batch_size=batch_size, max_tokens=MAX_TOKENS, max_frames=4,
                           image_size=IMAGE, tokens_per_frame=K, pad_id=0,
                           bucket_lengths=buckets, drop_remainder=False)
  return list(ds)


def test_batches_of_short_examples_come_out_at_the_bucket_length():
  lengths = [10, 30, 5, 3, 100, 3, 16, 17, 128, 1]
  buckets = (16, 32, 64)
  got = _batches(lengths, buckets)
  full = _batches(lengths, None)
  assert [b["tokens"].shape[1] for b in got] == [32, 16, 128, 32, 128]
  for b, f in zip(got, full):
    t = b["tokens"].shape[1]
    for key in ("tokens", "loss_mask", "vision_index", "segment_ids"):
      np.testing.assert_array_equal(b[key], f[key][:, :t])
      assert b[key].shape == (2, t)
    assert not f["segment_ids"][:, t:].any()                  # only padding was cut
    np.testing.assert_array_equal(b["frames"], f["frames"])   # frames keep max_frames
    assert f["tokens"].shape[1] == MAX_TOKENS


def test_distinct_shapes_are_bounded_by_the_buckets():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, MAX_TOKENS + 1, size=200).tolist()
  buckets = bucket_ladder(MAX_TOKENS, multiple=16)
  assert buckets == (16, 32, 64, 128)
  shapes = {b["tokens"].shape for b in _batches(lengths, buckets, batch_size=3)}
  assert {s[1] for s in shapes} <= set(buckets)
  assert len(shapes) <= len(buckets)


def test_ladder_and_settings():
  assert bucket_ladder(1000) == (256, 512, 1000)
  assert bucket_ladder(512) == (256, 512)
  assert bucket_ladder(96) == (96,)
  # A finer ratio: rungs rounded up to the multiple, repeats dropped, max_tokens last.
  assert bucket_ladder(32768, multiple=1024, ratio=2 ** 0.5) == (
      1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 23552, 32768)
  for max_tokens, multiple, ratio in [(32768, 1024, 1.3), (5000, 256, 1.5), (4096, 512, 3)]:
    ladder = bucket_ladder(max_tokens, multiple=multiple, ratio=ratio)
    assert ladder[-1] == max_tokens and list(ladder) == sorted(set(ladder))
    assert all(n % multiple == 0 for n in ladder[:-1])
    assert all(b <= -(-a * ratio // multiple) * multiple for a, b in zip(ladder, ladder[1:-1]))
  with pytest.raises(ValueError, match="ratio"):
    bucket_ladder(1024, ratio=1)
  base = {"stage": 1, "sources": {}, "max_frames": 4, "max_tokens": 1024, "batch_size": 2}
  assert data_settings(base)["bucket_lengths"] is None
  assert data_settings({**base, "bucket_lengths": "auto"})["bucket_lengths"] == (256, 512, 1024)
  assert data_settings({**base, "bucket_lengths": [256]})["bucket_lengths"] == (256,)
  with pytest.raises(ValueError, match="packing"):
    data_settings({**base, "bucket_lengths": "auto", "packing": True})
  with pytest.raises(ValueError, match="bucket_lengths"):
    data_settings({**base, "bucket_lengths": [2048]})
