"""Batching of examples into fixed-shape arrays, with optional packing, as a Grain stage.

Runs in the training process after the decoding workers, so it sees every element in
order: it counts skipped and truncated samples exactly (in the iterator's `stats`, which
are part of its checkpointed state; logged: the first ten, then at counts 16, 32, 64, ...)
and its state restores to the exact next batch. With skip_bad it gives up (DataError) when
so many samples in a row are skipped that a whole pass over the data decoded nothing.

The batches it makes (keys tokens, loss_mask, vision_index, segment_ids, frames,
frame_mask: their dtypes, shapes, padding and packing) follow the contract written once, in
docs/data_formats.md ("The batch contract"), packing included; data/batch.py types them.

Packing (`pack`) fills rows from a lookahead window of `pack_window` decoded examples
(oldest first, then best fit); the window is part of the iterator's state, so a resume
gives the same batches as a run that never stopped.

Length buckets (`bucket_lengths`, without packing): T is then the smallest bucket length
that holds the batch's longest row, not max_tokens, so a batch of short examples costs a
short step; the jitted step compiles once per bucket (see `bucket_ladder`).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

from ma2mba_jax.data.errors import DataError

log = logging.getLogger(__name__)

# Element markers from the decoding stage.
SKIPPED = "skipped"  # {"skipped": message}: a bad sample dropped under skip_bad
EMPTY = "empty"  # {"empty": True}: filler that becomes an all-padding row (eval shards)

# skipped_in_a_row: skip markers since the last example placed (the skip_bad give-up test).
_COUNTERS = ("batches", "examples", "skipped", "truncated", "dropped_exchanges",
             "skipped_in_a_row")
# Decoded examples the packer looks ahead over (data.pack_window): rows of SceneWalk-like
# lengths fill to about 99.5% from 8 on (83-88% with 1, the greedy in-order packer). The
# window costs host memory (that many decoded examples, frames included) and, at a resume,
# decoding again what was read since its oldest example (on those lengths about 4x the
# window: mean 23 / 63 / 139 examples for windows of 8 / 16 / 32).
DEFAULT_PACK_WINDOW = 16
# Skip messages kept for the give-up error.
_FIRST_BAD = 5


def bucket_ladder(max_tokens: int, multiple: int = 256, ratio: float = 2) -> tuple[int, ...]:
  """The default bucket lengths: multiple, multiple*ratio, ... (a geometric ladder, each
  rung rounded up to a multiple of `multiple`, e.g. the MA-GC time block), then max_tokens
  itself. A ratio under 2 wastes less padding for more compiles (one per bucket used)."""
  if multiple < 1 or not ratio > 1:
    raise ValueError(f"bucket_ladder needs multiple >= 1 and ratio > 1, got multiple="
                     f"{multiple}, ratio={ratio}")
  ladder, rung = [], float(multiple)
  while True:
    length = -(-round(rung, 6) // multiple) * multiple   # rounded up to the multiple
    if length >= max_tokens:
      break
    if not ladder or length > ladder[-1]:
      ladder.append(int(length))
    rung *= ratio
  return tuple(ladder) + (max_tokens,)


def bucket_length(used: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= used (buckets ascending, the last one max_tokens)."""
  for length in buckets:
    if length >= used:
      return length
  raise ValueError(f"{used} tokens exceed the largest bucket {buckets[-1]}")


def _worth_logging(count: int) -> bool:
  """Log the first 10 occurrences, then the 16th, 32nd, 64th, ... (counts stay exact in
  the iterator's `stats`)."""
  return count <= 10 or count & (count - 1) == 0


class _Rows:
  """The arrays of one batch being filled."""

  def __init__(self, batch_size, max_tokens, max_frames, image_size, tokens_per_frame, pad_id):
    b, t, f = batch_size, max_tokens, max_frames
    self.tokens_per_frame = tokens_per_frame
    self.arrays = {
        "tokens": np.full((b, t), pad_id, np.int32),
        "loss_mask": np.zeros((b, t), bool),
        "vision_index": np.full((b, t), -1, np.int32),
        "segment_ids": np.zeros((b, t), np.int32),
        "frames": np.zeros((b, f, image_size, image_size, 3), np.uint8),
        "frame_mask": np.zeros((b, f), bool),
    }
    self.row = 0  # row being filled
    self.token_pos = 0  # tokens used in that row
    self.frame_pos = 0  # frames used in that row
    self.segment = 0  # examples in that row
    self.used = False  # anything placed at all

  def fits(self, example: dict, *, empty_row: bool = False) -> bool:
    """Whether `example` fits in the rest of the current row (or in an empty row)."""
    max_tokens, max_frames = self.arrays["tokens"].shape[1], self.arrays["frame_mask"].shape[1]
    token_pos, frame_pos = (0, 0) if empty_row else (self.token_pos, self.frame_pos)
    return (token_pos + example["tokens"].size <= max_tokens
            and frame_pos + example["frames"].shape[0] <= max_frames)

  def next_row(self) -> bool:
    """Moves to a fresh row; False when the batch is full."""
    self.row += 1
    self.token_pos = self.frame_pos = self.segment = 0
    return self.row < self.arrays["tokens"].shape[0]

  def place(self, example: dict) -> None:
    a, r = self.arrays, self.row
    n, nf = example["tokens"].size, example["frames"].shape[0]
    t0, f0 = self.token_pos, self.frame_pos
    self.segment += 1
    a["tokens"][r, t0:t0 + n] = example["tokens"]
    a["loss_mask"][r, t0:t0 + n] = example["loss_mask"]
    vision = example["vision_index"]
    a["vision_index"][r, t0:t0 + n] = np.where(vision >= 0, vision + f0 * self.tokens_per_frame, -1)
    a["segment_ids"][r, t0:t0 + n] = self.segment
    a["frames"][r, f0:f0 + nf] = example["frames"]
    a["frame_mask"][r, f0:f0 + nf] = True
    self.token_pos += n
    self.frame_pos += nf
    self.used = True


class _Waiting(NamedTuple):
  """An example read from the parent but not yet placed (packing's lookahead window)."""
  seq: int  # its position among the elements this iterator read (from its start or anchor)
  parent_state: Any  # the parent's state just before it was read
  element: dict


class _PadBatchIterator(grain_dataset.DatasetIterator):
  """See PadBatchIterDataset.

  With packing, up to `pack_window` decoded examples wait in `_window`, in the order read.
  A row starts with the oldest waiting example, so none waits for more than pack_window row
  starts; the rest of the row is filled best-fit: the longest waiting example that still
  fits (tokens and frames; the oldest of equals), until none fits. A window of 1 is the
  greedy in-order packer: a row ends at the first example that does not fit.

  Exact resume: `get_state` holds the parent's state before the oldest waiting example
  (the anchor), how many elements were read since, and which of those still wait;
  `set_state` puts the parent back at the anchor and reads those elements again, keeping
  the waiting ones (the others were placed, or were skip markers, already counted).
  """

  def __init__(self, parent, cfg: dict[str, Any]):
    super().__init__(parent)
    self._cfg = cfg
    self._window: list[_Waiting] = []  # oldest first
    self._reads = 0  # elements read from the parent (since the start or the restored anchor)
    self._exhausted = False
    self.stats = dict.fromkeys(_COUNTERS, 0)
    self._first_bad: list[str] = []  # the first skip messages this iterator saw

  def _read(self) -> tuple[dict | None, Any]:
    """The parent's next element (None at its end) and the parent's state before it (kept
    only with packing: an unpacked batch leaves nothing waiting)."""
    state = self._parent.get_state() if self._cfg["pack"] else None
    try:
      element = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return None, state
    self._reads += 1
    return element, state

  def _fill_window(self, size: int) -> None:
    """Reads until `size` elements wait or the parent ends; skip markers are counted here,
    as they are read."""
    while len(self._window) < size and not self._exhausted:
      seq = self._reads
      element, state = self._read()
      if element is None:
        return
      if SKIPPED in element:
        self._skip(element[SKIPPED])
        continue
      self.stats["skipped_in_a_row"] = 0
      if EMPTY not in element and not (
          element["tokens"].size <= self._cfg["max_tokens"]
          and element["frames"].shape[0] <= self._cfg["max_frames"]):
        raise ValueError(f"example {element['id']} does not fit in a batch row "
                         f"({element['tokens'].size} tokens, {element['frames'].shape[0]} "
                         f"frames; max_tokens={self._cfg['max_tokens']}, max_frames="
                         f"{self._cfg['max_frames']})")
      self._window.append(_Waiting(seq, state, element))

  def _best_fit(self, rows: _Rows) -> int | None:
    """Index in the window of the longest example that fits the rest of the row (the
    oldest of equals; fillers never join a row), or None."""
    best, best_len = None, -1
    for i, waiting in enumerate(self._window):
      element = waiting.element
      if EMPTY in element or not rows.fits(element):
        continue
      if element["tokens"].size > best_len:
        best, best_len = i, element["tokens"].size
    return best

  def _account(self, example: dict) -> None:
    self.stats["examples"] += 1
    if example["num_dropped"]:
      self.stats["truncated"] += 1
      self.stats["dropped_exchanges"] += example["num_dropped"]
      if _worth_logging(self.stats["truncated"]):
        log.warning("sample %s: cut %d trailing exchange(s) to fit max_tokens/max_frames "
                    "(%d of %d samples truncated so far)", example["id"],
                    example["num_dropped"], self.stats["truncated"], self.stats["examples"])

  def _skip(self, message: str) -> None:
    """Counts a skipped sample; gives up when the skips in a row reach `give_up_after`
    (a whole pass over the index decoded nothing: skipping would go on forever)."""
    stats = self.stats
    stats["skipped"] += 1
    stats["skipped_in_a_row"] += 1
    if len(self._first_bad) < _FIRST_BAD:
      self._first_bad.append(message)
    if _worth_logging(stats["skipped"]):
      log.warning("skip_bad: skipped %s (%d samples skipped so far)", message,
                  stats["skipped"])
    limit = self._cfg["give_up_after"]
    if limit is not None and stats["skipped_in_a_row"] >= limit:
      first = "\n".join(f"  {m}" for m in self._first_bad)
      raise DataError(
          f"skip_bad: {stats['skipped_in_a_row']} samples in a row could not be decoded "
          f"({self._cfg['index_note']}), so no sample of a whole pass over the data decodes "
          f"({stats['skipped']} skipped, {stats['examples']} decoded in all); fix or remove "
          f"the bad files. The first bad samples:\n{first}")

  def __next__(self) -> dict[str, np.ndarray]:
    cfg = self._cfg
    batch_size, pack = cfg["batch_size"], cfg["pack"]
    window = cfg["pack_window"] if pack else 1
    rows = _Rows(batch_size, cfg["max_tokens"], cfg["max_frames"], cfg["image_size"],
                 cfg["tokens_per_frame"], cfg["pad_id"])
    while rows.row < batch_size:
      self._fill_window(window)
      if not self._window:
        break
      first = self._window.pop(0).element  # a row starts with the oldest waiting element
      rows.used = True
      if EMPTY not in first:  # (a filler is an all-padding row)
        self._account(first)
        rows.place(first)
        while pack:
          self._fill_window(window)
          best = self._best_fit(rows)
          if best is None:
            break
          example = self._window.pop(best).element
          self._account(example)
          rows.place(example)
      rows.next_row()
    if not rows.used:
      raise StopIteration
    if cfg["drop_remainder"] and rows.row < batch_size:
      raise StopIteration
    self.stats["batches"] += 1
    buckets = cfg.get("bucket_lengths")
    if buckets:
      arrays = rows.arrays
      used = int(np.max(np.nonzero(arrays["segment_ids"].any(axis=0))[0], initial=-1)) + 1
      length = bucket_length(max(used, 1), buckets)
      for key in ("tokens", "loss_mask", "vision_index", "segment_ids"):
        arrays[key] = arrays[key][:, :length]
    return rows.arrays

  def get_state(self) -> dict[str, Any]:
    """{"parent": the parent's state at the anchor, "stats": the counters, "window":
    {"read": elements read since the anchor, "waiting": their offsets from it that still
    wait, ascending}}. The anchor is the oldest waiting example (the parent's current state
    when none waits)."""
    if self._window:
      anchor = self._window[0]
      parent = anchor.parent_state
      window = {"read": self._reads - anchor.seq,
                "waiting": [w.seq - anchor.seq for w in self._window]}
    else:
      parent, window = self._parent.get_state(), {"read": 0, "waiting": []}
    return {"parent": parent, "stats": dict(self.stats), "window": window}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state`'s state (one without "window", from before the lookahead
    packer, holds no waiting example: its parent state already is the next one to read)."""
    self._parent.set_state(state["parent"])
    self._window, self._reads, self._exhausted = [], 0, False
    self.stats = {k: int(state["stats"].get(k, 0)) for k in _COUNTERS}
    window = state.get("window") or {"read": 0, "waiting": []}
    read, waiting = int(window["read"]), {int(i) for i in window["waiting"]}
    if waiting and (min(waiting) < 0 or max(waiting) >= read):
      raise ValueError(f"data iterator state: waiting offsets {sorted(waiting)} must lie in "
                       f"0..{read - 1} (read={read})")
    for seq in range(read):
      element, parent_state = self._read()
      if element is None:
        raise DataError(f"data iterator state: the data ends {seq} elements after the saved "
                        f"position, but the checkpoint had read {read} (did the data set "
                        f"change since it was saved?)")
      if seq not in waiting:
        continue  # placed in an earlier batch, or a skip marker counted then
      if SKIPPED in element:  # it decoded when saved; count it now that it does not
        self._skip(element[SKIPPED])
        continue
      self._window.append(_Waiting(seq, parent_state, element))


class PadBatchIterDataset(grain_dataset.IterDataset):
  """Batches decoded examples into the fixed-shape arrays of the module docstring.

  Without packing each example takes one row; with `pack`, a row takes the oldest waiting
  example, then best-fit from a lookahead window of up to `pack_window` decoded examples
  while their tokens and frames fit (see _PadBatchIterator; a window of 1 is the greedy
  in-order packer, which stops a row at the first example that does not fit). With `bucket_lengths`
  (ascending; max_tokens is added as the last) the token arrays are cut to the smallest
  bucket holding the batch's longest row. With `drop_remainder` a last
  incomplete batch is dropped, otherwise padded with empty rows.

  give_up_after: raise DataError once this many skip markers (skip_bad) come in a row
  with no example between them (None: never); index_note says what that count is, for the
  message (e.g. "twice the 120 samples of split 'train'").
  """

  def __init__(self, parent: grain_dataset.IterDataset, *, batch_size: int, max_tokens: int,
               max_frames: int, image_size: int, tokens_per_frame: int, pad_id: int,
               pack: bool = False, drop_remainder: bool = True,
               give_up_after: int | None = None, index_note: str = "the limit",
               bucket_lengths: tuple[int, ...] | None = None,
               pack_window: int = DEFAULT_PACK_WINDOW):
    super().__init__(parent)
    if not isinstance(pack_window, int) or pack_window < 1:
      raise ValueError(f"pack_window must be an integer >= 1, got {pack_window!r}")
    if give_up_after is not None and give_up_after < 1:
      raise ValueError(f"give_up_after must be >= 1 or None, got {give_up_after}")
    if bucket_lengths:
      bucket_lengths = tuple(sorted(int(n) for n in bucket_lengths))
      if bucket_lengths[0] < 1 or bucket_lengths[-1] > max_tokens:
        raise ValueError(f"bucket_lengths must be in 1..max_tokens={max_tokens}, got "
                         f"{bucket_lengths}")
      if bucket_lengths[-1] != max_tokens:
        bucket_lengths += (max_tokens,)
    else:
      bucket_lengths = None
    self._cfg = dict(batch_size=batch_size, max_tokens=max_tokens, max_frames=max_frames,
                     image_size=image_size, tokens_per_frame=tokens_per_frame, pad_id=pad_id,
                     pack=pack, drop_remainder=drop_remainder, give_up_after=give_up_after,
                     index_note=index_note, bucket_lengths=bucket_lengths,
                     pack_window=pack_window)

  def __iter__(self) -> _PadBatchIterator:
    return _PadBatchIterator(self._parent.__iter__(), self._cfg)

  def __str__(self) -> str:
    return f"PadBatchIterDataset({self._cfg})"
