"""Annotation formats of the three training stages, parsed into one common `Sample`.

| format    | stage | file                                   | one sample is                     |
|-----------|-------|----------------------------------------|-----------------------------------|
| llava     | 1, 3  | JSON list / JSONL, LLaVA conversations | an image or video with its turns  |
| webvid    | 1     | CSV / JSON / JSONL, WebVid columns     | a short video and its caption     |
| scenewalk | 2     | JSON list / JSONL, segments per video  | a long video: clip, caption, ...  |
| videomme  | eval  | JSON list / JSONL, Video-MME layout    | (`read_videomme`: MC questions)   |

A format is one module of this package, found by its name (`data.sources.<split>[i].format
= NAME` loads `ma2mba_jax/data/formats/NAME.py`); adding one is adding one file that
defines `parse(record: Record, media_root: str) -> Sample`, raising `record.error(...)`
(a DataError naming the file, the record index and id, and the field) for a record that
does not fit. Modules whose names start with "_" are shared code, not formats.

With `pack_per_video` (stage 3), all LLaVA records of one video become one sample, their
question-answer pairs in file order (the paper packs 1.3M QA pairs into 184K samples);
the pipeline packs across all of a split's LLaVA files.
A record with a missing or malformed field raises DataError; with `skip_bad` it is
skipped, logged and counted instead. docs/data_formats.md shows an example of each.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pkgutil
from collections.abc import Callable, Sequence

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.formats._common import (MC_INSTRUCTION, VIDEO_CAPTION_PROMPT, WHOLE,
                                             Exchange, MCQuestion, Record, Sample,
                                             SourceIndex, format_multiple_choice,
                                             load_records, media_path, strip_media_tags)
from ma2mba_jax.data.formats._videomme import read_videomme

__all__ = ["MC_INSTRUCTION", "VIDEO_CAPTION_PROMPT", "WHOLE", "Exchange", "MCQuestion",
           "Record", "Sample", "SourceIndex", "format_multiple_choice", "load_records",
           "media_path", "strip_media_tags", "read_videomme", "names", "parser",
           "pack_by_video", "read_source"]

log = logging.getLogger(__name__)


def names() -> tuple[str, ...]:
  """The formats: every module of this package not starting with "_", sorted."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if not m.name.startswith("_")))


def parser(fmt: str) -> Callable[[Record, str], Sample]:
  """The `parse` function of format module `fmt`."""
  if fmt.startswith("_") or fmt not in names():
    raise ValueError(f"unknown annotation format {fmt!r}; expected one of {names()} (a "
                     "format is a module ma2mba_jax/data/formats/<name>.py)")
  module = importlib.import_module(f"{__name__}.{fmt}")
  parse = getattr(module, "parse", None)
  if not callable(parse):
    raise TypeError(f"{os.path.basename(module.__file__ or fmt)}: format {fmt!r} must define "
                    "parse(record, media_root) -> Sample")
  return parse


def pack_by_video(samples: Sequence[Sample], qa_per_sample: int | None = None) -> list[Sample]:
  """Merges the samples of each media file (in order of first appearance; their exchanges
  in the given order) into samples of up to `qa_per_sample` exchanges (None: all), each
  showing the frames before its first question."""
  groups: dict[str, list[Sample]] = {}
  for sample in samples:
    groups.setdefault(sample.path, []).append(sample)
  packed = []
  for group in groups.values():
    exchanges = [ex for sample in group for ex in sample.exchanges]
    step = qa_per_sample or len(exchanges)
    for first in range(0, len(exchanges), step):
      chunk = exchanges[first:first + step]
      # The frames go with the first question of each packed sample only.
      chunk = [dataclasses.replace(chunk[0], span=WHOLE)] + [
          dataclasses.replace(ex, span=None) for ex in chunk[1:]]
      head = group[0]
      sample_id = head.id if len(group) == 1 and step >= len(exchanges) else (
          f"{head.id}+{len(group) - 1}#{first // step}")
      packed.append(dataclasses.replace(head, id=sample_id, exchanges=tuple(chunk)))
  return packed


def read_source(
    fmt: str,
    annotations: str,
    media_root: str = "",
    *,
    skip_bad: bool = False,
    pack_per_video: bool = False,
    qa_per_sample: int | None = None,
) -> SourceIndex:
  """Parses an annotation file of format `fmt` (one of `names()`) into samples.

  media_root: folder that relative media paths are under (default: the file's folder).
  pack_per_video: merge all records of a video into samples of up to `qa_per_sample`
  exchanges (all of them when None).
  """
  parse = parser(fmt)
  annotations = os.fspath(annotations)
  media_root = os.fspath(media_root) or os.path.dirname(os.path.abspath(annotations))
  samples, skipped = [], []
  for index, record in enumerate(load_records(annotations)):
    try:
      samples.append(parse(Record(record, annotations, index), media_root))
    except DataError as e:
      if not skip_bad:
        raise
      skipped.append(str(e))
      log.warning("skip_bad: skipped %s", e)
  if skipped:
    log.warning("skip_bad: skipped %d of %d records of %s", len(skipped),
                len(samples) + len(skipped), annotations)
  if pack_per_video:
    samples = pack_by_video(samples, qa_per_sample)
  return SourceIndex(samples, skipped)
