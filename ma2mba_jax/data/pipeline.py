"""The Grain input pipeline: annotation index -> shuffle -> shard -> decode and tokenise
(worker processes) -> fixed-shape batches (see batching.py for the batch contract).

    MapDataset.source(samples)        random access over the parsed annotation records
      .shuffle(seed).repeat(epochs)   train split only: a new order each epoch
      [shard_index::shard_count]      this process's share (jax.process_index/count)
      .map(_Decode)                   PyAV decode + chat template (example.py)
      .to_iter_dataset(read_options)  `read_threads` threads per worker
      .mp_prefetch(num_workers)       worker processes (none when num_workers=0)
    PadBatchIterDataset               pad or pack into the batch arrays, in this process

Resuming: the iterator's state (`get_state`/`set_state`, JSON) is saved with the model
through Orbax, e.g.

    manager = ocp.CheckpointManager(workdir, item_names=("state", "data"))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(
        state=..., data=grain.checkpoint.CheckpointRestore(iterator)))

after which `iterator` yields exactly the batches the interrupted run would have seen next.

The data config (a dict or ml_collections.ConfigDict), fields with defaults in DEFAULTS:
  stage             1 | 2 | 3 (stage 3 packs each video's QA records into one sample)
  sources           {split: [{"format": llava|webvid|scenewalk, "annotations": file,
                    "media_root": folder}, ...]}
  fps, image_size, tokens_per_frame, max_frames, max_tokens   per-example budget
  batch_size        examples (rows) per batch for THIS process
  packing           pack several examples into a row (else one example per row)
  pack_window       with packing, decoded examples the packer looks ahead over to fill a
                    row (best fit; 1: greedy in order, a row ends at the first that does
                    not fit); default batching.DEFAULT_PACK_WINDOW
  bucket_lengths    None: every batch is max_tokens long; "auto": the geometric ladder
                    batching.bucket_ladder(max_tokens); or a list of lengths: each batch is
                    cut to the smallest bucket holding its longest row (not with packing)
  num_workers       decoding worker processes (0: decode in this process)
  worker_buffer_size  decoded samples each worker keeps ready
  read_threads, read_buffer_size  threads (and their queue) decoding inside each worker
  decode_threads    FFmpeg threads per video decode (1; 0 = one per core)
  seed, num_epochs (None: repeat forever), qa_per_sample
  skip_bad          drop (log and count) bad records and samples instead of raising; gives
                    up with a DataError when a whole pass over the index decodes nothing
  validate_media    (default True) when the index is built, check every referenced media
                    file once, in parallel (a video's header; an image's picture): all
                    missing or unreadable files are named in one DataError before anything
                    is decoded; with skip_bad their samples are dropped with a warning
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import tokenizers
from absl import flags

from ma2mba_jax.data import formats
from ma2mba_jax.data.batching import (DEFAULT_PACK_WINDOW, EMPTY, SKIPPED,
                                      PadBatchIterDataset, bucket_ladder)
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.example import ExampleSpec, build_example
from ma2mba_jax.data.formats import Sample, pack_by_video, read_source
from ma2mba_jax.data.tokenizer import special_ids
from ma2mba_jax.data.video import probe_media

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "fps": 1.0,
    "image_size": 224,
    "tokens_per_frame": 144,
    "packing": False,
    "pack_window": DEFAULT_PACK_WINDOW,
    "bucket_lengths": None,
    "num_workers": 0,
    "worker_buffer_size": 2,
    "read_threads": 1,
    "read_buffer_size": 2,
    "decode_threads": 1,
    "seed": 0,
    "num_epochs": None,
    "skip_bad": False,
    "qa_per_sample": None,
    "validate_media": True,
}
# Bad media files named in one DataError (the rest are counted).
MAX_NAMED_BAD = 50
# Threads that check media files (file opens: I/O bound).
CHECK_THREADS = 16
# Media files that passed the check in this process, as (path, size, mtime): the eval split
# is indexed again at every evaluation, and an unchanged file is not opened again.
_GOOD_MEDIA: set[tuple[str, int, int]] = set()
REQUIRED = ("stage", "sources", "max_frames", "max_tokens", "batch_size")
TRAIN_SPLIT = "train"
# Stands for a missing sample in an eval shard (Grain reads None as "filtered out").
FILLER = "<filler>"


def data_settings(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config's fields with defaults filled in, checked; ValueError names a bad field."""
  settings = dict(DEFAULTS)
  for key in config.keys():
    settings[key] = config[key]
  missing = [key for key in REQUIRED if key not in settings]
  if missing:
    raise ValueError(f"data config lacks field(s) {missing}")
  if settings["stage"] not in (1, 2, 3):
    raise ValueError(f"data.stage must be 1, 2 or 3, got {settings['stage']!r}")
  for key in ("max_frames", "max_tokens", "batch_size", "tokens_per_frame", "image_size",
              "worker_buffer_size", "read_threads", "read_buffer_size", "pack_window"):
    if not isinstance(settings[key], int) or settings[key] < 1:
      raise ValueError(f"data.{key} must be a positive integer, got {settings[key]!r}")
  if not isinstance(settings["num_workers"], int) or settings["num_workers"] < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {settings['num_workers']!r}")
  if not isinstance(settings["decode_threads"], int) or settings["decode_threads"] < 0:
    raise ValueError(f"data.decode_threads must be >= 0, got {settings['decode_threads']!r}")
  if not settings["fps"] > 0:
    raise ValueError(f"data.fps must be > 0, got {settings['fps']!r}")
  buckets = settings["bucket_lengths"]
  if buckets == "auto":
    settings["bucket_lengths"] = bucket_ladder(settings["max_tokens"])
  elif buckets:
    buckets = tuple(buckets)
    if not all(isinstance(n, int) and 1 <= n <= settings["max_tokens"] for n in buckets):
      raise ValueError(f"data.bucket_lengths must be ints in 1..max_tokens, got {buckets!r}")
    settings["bucket_lengths"] = buckets
  else:
    settings["bucket_lengths"] = None
  if settings["bucket_lengths"] and settings["packing"]:
    raise ValueError("data.bucket_lengths needs packing=False (packed rows fill max_tokens)")
  return settings


def build_index(config: Mapping[str, Any], split: str = TRAIN_SPLIT) -> list[Sample]:
  """All samples of `split`, parsed from its annotation files (records skipped under
  skip_bad are logged and counted by `read_source`), their media checked when
  validate_media is on (see `check_media`)."""
  settings = data_settings(config)
  sources = settings["sources"]
  if split not in sources:
    raise ValueError(f"data.sources has no split {split!r} (has {sorted(sources.keys())})")
  samples: list[Sample] = []
  qa_samples: list[Sample] = []  # stage 3: packed per video across all files below
  empty_files: list[str] = []
  for i, source in enumerate(sources[split]):
    for key in ("format", "annotations"):
      if key not in source:
        raise ValueError(f"data.sources.{split}[{i}] lacks field '{key}'")
    if source["format"] not in formats.names():
      raise ValueError(f"data.sources.{split}[{i}].format must be one of {formats.names()}, "
                       f"got {source['format']!r}")
    index = read_source(
        source["format"], source["annotations"], source.get("media_root", "") or "",
        skip_bad=settings["skip_bad"])
    if not index.samples and not index.skipped:
      empty_files.append(str(source["annotations"]))
      log.warning("data %s: %s holds no records (an empty annotation list)", split,
                  source["annotations"])
      continue
    log.info("data %s: %d records from %s (%s)%s", split, len(index.samples),
             source["annotations"], source["format"],
             f", {len(index.skipped)} bad records skipped" if index.skipped else "")
    packs = settings["stage"] == 3 and source["format"] == "llava"
    (qa_samples if packs else samples).extend(index.samples)
  if empty_files and len(empty_files) == len(sources[split]):
    raise DataError(f"data split {split!r}: every annotation file is empty: "
                    f"{', '.join(empty_files)}")
  if settings["validate_media"]:
    samples = check_media(samples, skip_bad=settings["skip_bad"], split=split)
    qa_samples = check_media(qa_samples, skip_bad=settings["skip_bad"], split=split)
  if qa_samples:
    packed = pack_by_video(qa_samples, settings["qa_per_sample"])
    log.info("data %s: %d QA records packed into %d samples (one video each)", split,
             len(qa_samples), len(packed))
    samples.extend(packed)
  if not samples:
    raise DataError(f"data split {split!r} has no samples")
  return samples


def check_media(samples: Sequence[Sample], *, skip_bad: bool = False,
                split: str = TRAIN_SPLIT) -> list[Sample]:
  """Checks each distinct media file of `samples` once, in CHECK_THREADS threads
  (video.probe_media). Raises one DataError naming every bad file (up to MAX_NAMED_BAD)
  with the annotation file and record that uses it; with skip_bad, returns the samples
  whose media read and logs a warning with the counts instead."""
  paths: dict[str, str] = {}  # path -> media kind, first use order
  for sample in samples:
    paths.setdefault(sample.path, sample.media)
  if not paths:
    return list(samples)
  start = time.perf_counter()
  def check(item: tuple[str, str]) -> str | None:
    path, media = item
    try:
      stat = os.stat(path)
      key = (path, stat.st_size, stat.st_mtime_ns)
    except OSError:
      key = None
    if key in _GOOD_MEDIA:
      return None
    reason = probe_media(path, media)
    if reason is None and key is not None:
      _GOOD_MEDIA.add(key)
    return reason

  with concurrent.futures.ThreadPoolExecutor(min(CHECK_THREADS, len(paths))) as pool:
    reasons = list(pool.map(check, paths.items()))
  bad = {path: reason for path, reason in zip(paths, reasons) if reason is not None}
  log.info("data %s: checked %d media files in %.1f s, %d bad", split, len(paths),
           time.perf_counter() - start, len(bad))
  if not bad:
    return list(samples)
  users: dict[str, list[Sample]] = {}
  for sample in samples:
    if sample.path in bad:
      users.setdefault(sample.path, []).append(sample)
  lines = []
  for path, reason in list(bad.items())[:MAX_NAMED_BAD]:
    first = users[path][0]
    more = len(users[path]) - 1
    lines.append(f"  {reason} [{first.source}: record {first.record} (id {first.id})"
                 f"{f' and {more} more record(s)' if more else ''}]")
  if len(bad) > MAX_NAMED_BAD:
    lines.append(f"  ... and {len(bad) - MAX_NAMED_BAD} more bad files")
  n_bad_samples = sum(len(u) for u in users.values())
  summary = (f"data {split!r}: {len(bad)} of {len(paths)} media files are missing or "
             f"unreadable ({n_bad_samples} of {len(samples)} records use them)")
  if not skip_bad:
    raise DataError(f"{summary}:\n" + "\n".join(lines) +
                    "\n(fix or remove them, or set data.skip_bad=True to drop them)")
  kept = [s for s in samples if s.path not in bad]
  if not kept:
    raise DataError(f"{summary}, so none is left:\n" + "\n".join(lines))
  log.warning("skip_bad: %s; dropped:\n%s", summary, "\n".join(lines))
  return kept


@dataclasses.dataclass(frozen=True)
class _Decode:
  """Grain map: Sample -> example dict (example.py) or a skip marker; FILLER -> empty row."""
  tokenizer: tokenizers.Tokenizer
  spec: ExampleSpec
  skip_bad: bool

  def __call__(self, sample: Sample | str) -> dict:
    if sample == FILLER:
      return {EMPTY: True}
    try:
      return build_example(sample, tokenizer=self.tokenizer, spec=self.spec)
    except DataError as e:
      if not self.skip_bad:
        raise
      return {SKIPPED: str(e)}


def _shard_for_eval(samples: Sequence[Sample], index: int, count: int) -> list[Sample | str]:
  """Every `count`-th sample from `index`, padded with FILLER (empty rows) so that every
  process gets the same number of batches."""
  per_shard = math.ceil(len(samples) / count)
  return [samples[j] if (j := index + i * count) < len(samples) else FILLER
          for i in range(per_shard)]


def make_pipeline(
    config: Mapping[str, Any],
    *,
    tokenizer: tokenizers.Tokenizer,
    split: str = TRAIN_SPLIT,
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
  """The batches of `split` for one process, as a Grain IterDataset; `iter()` it.

  The train split is shuffled with `seed` (default config seed), repeated for num_epochs
  (forever when None) and drops a last incomplete batch. Other splits are read once in
  order; their last batch is padded with empty rows (segment_ids all 0), and every process
  gets the same number of batches. shard_index/shard_count default to
  jax.process_index()/jax.process_count(). (With a finite num_epochs, train shards can
  differ by a batch at the very end: train for a fixed number of steps.)
  """
  settings = data_settings(config)
  if shard_index is None or shard_count is None:
    import jax  # only here: the data side needs no accelerator otherwise
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  samples = build_index(config, split)
  train = split == TRAIN_SPLIT
  if train:
    ds = grain.MapDataset.source(samples)
    ds = ds.shuffle(seed=settings["seed"] if seed is None else seed)
    ds = ds.repeat(settings["num_epochs"])
    ds = ds[shard_index::shard_count]
    # skip_bad gives up after twice this process's share of an epoch in a row: any such
    # run of its elements holds its whole share of some epoch (or after all of a finite
    # stream).
    share = math.ceil(len(samples) / shard_count)
    give_up_after = min(2 * share, len(ds))
    index_note = (f"twice this process's share ({share}) of the {len(samples)} samples of "
                  f"split {split!r}" if give_up_after == 2 * share else
                  f"all {give_up_after} samples this process reads")
  else:
    shard = _shard_for_eval(samples, shard_index, shard_count)
    ds = grain.MapDataset.source(shard)
    give_up_after = sum(s != FILLER for s in shard) or None
    index_note = f"all {give_up_after} samples of split {split!r} this process reads"
  spec = ExampleSpec(fps=float(settings["fps"]), image_size=settings["image_size"],
                     tokens_per_frame=settings["tokens_per_frame"],
                     max_frames=settings["max_frames"], max_tokens=settings["max_tokens"],
                     decode_threads=settings["decode_threads"])
  ds = ds.map(_Decode(tokenizer, spec, bool(settings["skip_bad"])))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=settings["read_threads"], prefetch_buffer_size=settings["read_buffer_size"]))
  if settings["num_workers"] > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks,
    # scripts) nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=settings["num_workers"],
        per_worker_buffer_size=settings["worker_buffer_size"]))
  return PadBatchIterDataset(
      ds, batch_size=settings["batch_size"], max_tokens=settings["max_tokens"],
      max_frames=settings["max_frames"], image_size=settings["image_size"],
      tokens_per_frame=settings["tokens_per_frame"],
      pad_id=special_ids(tokenizer).endoftext, pack=bool(settings["packing"]),
      drop_remainder=train, give_up_after=give_up_after if settings["skip_bad"] else None,
      index_note=index_note, bucket_lengths=settings["bucket_lengths"],
      pack_window=settings["pack_window"])
