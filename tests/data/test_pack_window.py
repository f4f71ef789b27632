"""The packer's lookahead window (data.pack_window, issue 17): rows fill better than the
greedy in-order packer, a window of 1 is that packer, every example is placed exactly once,
skip markers are counted as before, and a resume from the state after any batch gives the
batches of a run that never stopped."""

import json

import grain
import numpy as np
import pytest

from ma2mba_jax.data import synthetic
from ma2mba_jax.data.batching import DEFAULT_PACK_WINDOW, EMPTY, SKIPPED, PadBatchIterDataset
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.pipeline import data_settings

IMAGE, K = 2, 2  # image size, tokens per frame
ID0 = 10_000  # an example's first token is ID0 + its index: it names the example in a row


def _example(i: int, n_tokens: int, n_frames: int) -> dict:
  rng = np.random.default_rng(i)
  tokens = rng.integers(1, 100, size=n_tokens).astype(np.int32)
  tokens[0] = ID0 + i
  vision = np.full(n_tokens, -1, np.int32)
  vision[1:1 + n_frames * K] = np.arange(n_frames * K)
  return {"id": f"ex{i}", "num_dropped": int(i % 7 == 3), "tokens": tokens,
          "loss_mask": rng.random(n_tokens) < 0.5, "vision_index": vision,
          "frames": np.full((n_frames, IMAGE, IMAGE, 3), i % 251, np.uint8)}


def _stream(n: int, max_tokens: int, max_frames: int, seed: int, bad_every: int = 0):
  """n examples with random lengths and frame counts (each fits one row), a skip marker
  after every bad_every-th."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    frames = int(rng.integers(0, max_frames + 1))
    tokens = int(rng.integers(1 + frames * K, max_tokens + 1))
    out.append(_example(i, tokens, frames))
    if bad_every and i % bad_every == bad_every - 1:
      out.append({SKIPPED: f"bad{i}.mp4: broken"})
  return out


def _batcher(elements, *, window: int, batch_size: int = 2, max_tokens: int = 64,
             max_frames: int = 6, drop_remainder: bool = False, **kw) -> PadBatchIterDataset:
  return PadBatchIterDataset(
      grain.MapDataset.source(elements).to_iter_dataset(), batch_size=batch_size,
      max_tokens=max_tokens, max_frames=max_frames, image_size=IMAGE, tokens_per_frame=K,
      pad_id=0, pack=True, drop_remainder=drop_remainder, pack_window=window, **kw)


def _rows(batches) -> list[list[int]]:
  """The examples (indices) of each row, in placement order."""
  out = []
  for batch in batches:
    for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
      starts = np.flatnonzero(np.diff(segments, prepend=0) > 0)
      out.append([int(tokens[s]) - ID0 for s in starts])
  return out


def _greedy_rows(examples, max_tokens: int, max_frames: int) -> list[list[int]]:
  """The greedy in-order packer, written plainly: a row takes examples in order until
  one does not fit (tokens or frames); that one starts the next row."""
  rows, row, used_t, used_f = [], [], 0, 0
  for i, ex in enumerate(examples):
    t, f = ex["tokens"].size, ex["frames"].shape[0]
    if row and (used_t + t > max_tokens or used_f + f > max_frames):
      rows.append(row)
      row, used_t, used_f = [], 0, 0
    row.append(i)
    used_t, used_f = used_t + t, used_f + f
  return rows + ([row] if row else [])


def test_window_of_one_is_the_greedy_packer():
  for seed in range(5):
    examples = _stream(80, 64, 6, seed)
    got = _rows(_batcher(examples, window=1))
    expected = _greedy_rows(examples, 64, 6)
    expected += [[]] * (len(got) - len(expected))  # the last batch's empty padding row
    assert got == expected


def test_rows_fill_better_than_greedy_on_scenewalk_lengths():
  max_tokens = 4096
  lengths = synthetic.scenewalk_lengths(np.random.default_rng(0), 400, max_tokens=max_tokens)
  examples = [_example(i, int(n), 0) for i, n in enumerate(lengths)]

  def fill(window: int) -> float:
    batches = list(_batcher(examples, window=window, batch_size=1, max_tokens=max_tokens,
                            drop_remainder=True))
    assert len(batches) > 42
    # The first 40 rows (about 310 examples): the rows at the end, when the window drains,
    # take what is left.
    return sum(int((b["segment_ids"] > 0).sum()) for b in batches[:40]) / (40 * max_tokens)

  greedy, lookahead = fill(1), fill(32)
  # Measured: greedy 0.863, window 8: 0.995, window 32: 0.998.
  assert greedy < 0.9
  assert lookahead >= 0.99


@pytest.mark.parametrize("window", [1, 3, 16])
def test_every_example_placed_once_and_none_waits_long(window):
  examples = _stream(150, 64, 6, seed=window, bad_every=11)
  it = iter(_batcher(examples, window=window, batch_size=3))
  batches = list(it)
  rows = _rows(batches)
  placed = [i for row in rows for i in row]
  assert sorted(placed) == list(range(150))
  assert it.stats["examples"] == 150 and it.stats["skipped"] == 150 // 11
  assert it.stats["truncated"] == sum(1 for i in range(150) if i % 7 == 3)
  # The window holds the `window` oldest unplaced examples: a row starts with the oldest
  # (so none waits more than `window` row starts), the others come from the window.
  unplaced = list(range(150))
  for row in rows:
    for j, i in enumerate(row):
      assert i == unplaced[0] if j == 0 else i in unplaced[:window], (row, unplaced[:window])
      unplaced.remove(i)
  # The arrays of every placed example are its own, where the layout puts them.
  for batch in batches:
    for r in range(batch["tokens"].shape[0]):
      seg, f0 = batch["segment_ids"][r], 0
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        ex = examples_by_id(examples)[int(batch["tokens"][r, where[0]]) - ID0]
        np.testing.assert_array_equal(batch["tokens"][r, where], ex["tokens"])
        np.testing.assert_array_equal(batch["loss_mask"][r, where], ex["loss_mask"])
        nf = ex["frames"].shape[0]
        np.testing.assert_array_equal(batch["frames"][r, f0:f0 + nf], ex["frames"])
        vision = ex["vision_index"]
        np.testing.assert_array_equal(batch["vision_index"][r, where],
                                      np.where(vision >= 0, vision + f0 * K, -1))
        f0 += nf
      assert batch["frame_mask"][r].sum() == f0


def examples_by_id(elements) -> dict[int, dict]:
  return {int(e["tokens"][0]) - ID0: e for e in elements if SKIPPED not in e}


@pytest.mark.parametrize("window,batch_size", [(1, 2), (4, 1), (8, 2)])
def test_resume_after_every_batch_gives_the_same_batches(window, batch_size):
  elements = _stream(60, 64, 6, seed=100 + window, bad_every=9)
  elements.insert(5, {SKIPPED: "early.mp4: broken"})
  ds = _batcher(elements, window=window, batch_size=batch_size, drop_remainder=True,
                give_up_after=4)
  full_it = iter(ds)
  expected, states = [], [json.loads(json.dumps(full_it.get_state()))]
  for batch in full_it:
    expected.append(batch)
    states.append(json.loads(json.dumps(full_it.get_state())))  # as a checkpoint holds it
  assert len(expected) > 10
  for k, state in enumerate(states):
    resumed = iter(ds)
    resumed.set_state(state)
    assert resumed.get_state() == state
    rest = list(resumed)
    assert len(rest) == len(expected) - k, k
    for got, want in zip(rest, expected[k:]):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"after {k}: {key}")
    assert resumed.stats == full_it.stats


def test_state_without_a_window_from_before_restores():
  """A checkpoint of the greedy packer held the parent's state before the one example it
  had read ahead and no "window": restoring reads that example again."""
  elements = _stream(30, 64, 6, seed=7)
  ds = _batcher(elements, window=1, batch_size=2)
  it = iter(ds)
  next(it)
  state = it.get_state()
  assert state["window"]["waiting"] == [0] and state["window"]["read"] == 1
  old = {"parent": state["parent"], "stats": state["stats"]}
  resumed = iter(ds)
  resumed.set_state(old)
  for got, want in zip(resumed, it):
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_skip_markers_and_give_up_with_a_window():
  bad = {SKIPPED: "bad.mp4: broken"}
  good = _stream(3, 64, 6, seed=3)
  it = iter(_batcher([good[0], bad, bad, good[1], bad, bad, good[2]], window=8,
                     batch_size=1, give_up_after=3))
  rows = _rows(list(it))
  assert sorted(i for row in rows for i in row) == [0, 1, 2]
  assert it.stats["skipped"] == 4 and it.stats["skipped_in_a_row"] == 0
  it = iter(_batcher([good[0], bad, bad, bad, good[1]], window=8, batch_size=1,
                     give_up_after=3))
  with pytest.raises(DataError, match="3 samples in a row .*3 skipped"):
    next(it)


def test_fillers_stay_padding_rows():
  good = _stream(4, 64, 6, seed=4)
  elements = good[:2] + [{EMPTY: True}] + good[2:] + [{EMPTY: True}]
  rows = _rows(_batcher(elements, window=4, batch_size=2))
  assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]
  assert rows.count([]) >= 2


def test_bad_window_and_oversized_example_are_named():
  with pytest.raises(ValueError, match="pack_window"):
    _batcher([], window=0)
  base = {"stage": 1, "sources": {}, "max_frames": 4, "max_tokens": 1024, "batch_size": 2}
  assert data_settings(base)["pack_window"] == DEFAULT_PACK_WINDOW == 16
  with pytest.raises(ValueError, match="data.pack_window"):
    data_settings({**base, "pack_window": 0})
  with pytest.raises(ValueError, match="ex0 does not fit .*max_tokens=8"):
    next(iter(_batcher([_example(0, 9, 0)], window=4, max_tokens=8)))
