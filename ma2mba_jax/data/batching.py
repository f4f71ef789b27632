"""Batching of examples into fixed-shape arrays, with optional packing, as a Grain stage.

Runs in the training process after the decoding workers, so it sees every element in
order: it counts skipped and truncated samples exactly (in the iterator's `stats`, which
are part of its checkpointed state; logged: the first ten, then at counts 16, 32, 64, ...)
and its state restores to the exact next batch. With skip_bad it gives up (DataError) when
so many samples in a row are skipped that a whole pass over the data decoded nothing.

The batches it makes (keys tokens, loss_mask, vision_index, segment_ids, frames,
frame_mask: their dtypes, shapes, padding and packing) follow the contract written once, in
docs/data_formats.md ("The batch contract"), packing included; data/batch.py types them.

Length buckets (`bucket_lengths`, without packing): T is then the smallest bucket length
that holds the batch's longest row, not max_tokens, so a batch of short examples costs a
short step; the jitted step compiles once per bucket (see `bucket_ladder`).
"""

from __future__ import annotations

import logging
from typing import Any

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


class _PadBatchIterator(grain_dataset.DatasetIterator):
  """See PadBatchIterDataset."""

  def __init__(self, parent, cfg: dict[str, Any]):
    super().__init__(parent)
    self._cfg = cfg
    self._pending: dict | None = None  # an example read but not yet placed (packing)
    self._pending_state: Any = None  # the parent's state before that example was read
    self._exhausted = False
    self.stats = dict.fromkeys(_COUNTERS, 0)
    self._first_bad: list[str] = []  # the first skip messages this iterator saw

  def _read(self) -> tuple[dict | None, Any]:
    """The parent's next element (None at its end) and the parent's state before it."""
    state = self._parent.get_state() if self._cfg["pack"] else None
    try:
      return next(self._parent), state
    except StopIteration:
      self._exhausted = True
      return None, state

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
    rows = _Rows(batch_size, cfg["max_tokens"], cfg["max_frames"], cfg["image_size"],
                 cfg["tokens_per_frame"], cfg["pad_id"])
    while rows.row < batch_size:
      if self._pending is not None:
        element, state = self._pending, self._pending_state
        self._pending = self._pending_state = None
      elif self._exhausted:
        break
      else:
        element, state = self._read()
        if element is None:
          break
      if SKIPPED in element:
        self._skip(element[SKIPPED])
        continue
      if EMPTY not in element and not rows.fits(element, empty_row=True):
        raise ValueError(f"example {element['id']} does not fit in a batch row "
                         f"({element['tokens'].size} tokens, {element['frames'].shape[0]} frames)")
      # A packed row that is in use takes the element only if it fits; else start a row.
      if rows.segment and (EMPTY in element or not rows.fits(element)):
        if not rows.next_row():
          self._pending, self._pending_state = element, state
          break
      if EMPTY in element:  # an all-padding row
        rows.used = True
        rows.next_row()
        continue
      self._account(element)
      self.stats["skipped_in_a_row"] = 0
      rows.place(element)
      if not pack:
        rows.next_row()
    if not rows.used:
      raise StopIteration
    complete_rows = rows.row + (1 if rows.row < batch_size and rows.segment else 0)
    if cfg["drop_remainder"] and complete_rows < batch_size:
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
    parent = self._pending_state if self._pending is not None else self._parent.get_state()
    return {"parent": parent, "stats": dict(self.stats)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending, self._pending_state, self._exhausted = None, None, False
    self.stats = {k: int(state["stats"].get(k, 0)) for k in _COUNTERS}


class PadBatchIterDataset(grain_dataset.IterDataset):
  """Batches decoded examples into the fixed-shape arrays of the module docstring.

  Without packing each example takes one row; with `pack`, examples fill a row in order
  while both its tokens and frames fit (greedy, order kept). With `bucket_lengths`
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
               bucket_lengths: tuple[int, ...] | None = None):
    super().__init__(parent)
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
                     index_note=index_note, bucket_lengths=bucket_lengths)

  def __iter__(self) -> _PadBatchIterator:
    return _PadBatchIterator(self._parent.__iter__(), self._cfg)

  def __str__(self) -> str:
    return f"PadBatchIterDataset({self._cfg})"
