"""Annotation formats of the three training stages, parsed into one common `Sample`.

| format    | stage | file                                   | one sample is                     |
|-----------|-------|----------------------------------------|-----------------------------------|
| llava     | 1, 3  | JSON list / JSONL, LLaVA conversations | an image or video with its turns  |
| webvid    | 1     | CSV / JSON / JSONL, WebVid columns     | a short video and its caption     |
| scenewalk | 2     | JSON list / JSONL, segments per video  | a long video: clip, caption, ...  |
| videomme  | eval  | JSON list / JSONL, Video-MME layout    | (`read_videomme`: MC questions)   |

With `pack_per_video` (stage 3), all LLaVA records of one video become one sample, their
question-answer pairs in file order (the paper packs 1.3M QA pairs into 184K samples);
the pipeline packs across all of a split's LLaVA files.
A record with a missing or malformed field raises DataError naming the file, the record
index and id, and the field; with `skip_bad` it is skipped, logged and counted instead.
docs/data_formats.md shows an example of each.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.video import TIME_TOLERANCE

log = logging.getLogger(__name__)

# The whole image or video (a span with no bounds).
WHOLE = (None, None)
# The user turn of a WebVid caption pair (WebVid has captions only).
VIDEO_CAPTION_PROMPT = "Describe the video briefly."
# Appended to multiple-choice questions (the usual Video-MME prompt).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_MEDIA_TAGS = ("<image>", "<video>")


@dataclasses.dataclass(frozen=True)
class Exchange:
  """One user -> assistant exchange.

  span: the part of the media shown as frames at the start of this user turn, before
    `user`: (start, end) in seconds with None for the video's bounds, WHOLE for the whole
    image/video, or None for no frames (a follow-up question about frames already seen).
  """
  user: str
  assistant: str
  span: tuple[float | None, float | None] | None


@dataclasses.dataclass(frozen=True)
class Sample:
  """A training sample before decoding: a media file and exchanges about it.

  source/record: the annotation file and the index of the (first) record it came from,
  for error messages. media: 'image' or 'video'.
  """
  id: str
  source: str
  record: int
  media: str
  path: str
  exchanges: tuple[Exchange, ...]


@dataclasses.dataclass(frozen=True)
class MCQuestion:
  """A multiple-choice question about a video (Video-MME layout)."""
  question_id: str
  video_id: str
  path: str
  duration: str  # 'short' | 'medium' | 'long'
  task_type: str
  question: str
  options: tuple[str, ...]  # ("A. ...", "B. ...", ...)
  answer: str  # "A"


@dataclasses.dataclass
class SourceIndex:
  """The samples of one annotation file and the records skipped (messages)."""
  samples: list[Sample]
  skipped: list[str]


def format_multiple_choice(question: str, options: Sequence[str]) -> str:
  """The user text of a multiple-choice question: question, one option a line, instruction."""
  return "\n".join([question, *options, MC_INSTRUCTION])


# ---------------------------------------------------------------------------------------
# Reading files and fields.


def load_records(path: str) -> list[dict[str, Any]]:
  """Records of a .json (a list), .jsonl (one object a line) or .csv (header row) file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: annotation file not found")
  with open(path, encoding="utf-8", newline="") as f:
    if path.endswith(".csv"):
      return list(csv.DictReader(f))
    if path.endswith(".jsonl"):
      records = []
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no} is not valid JSON ({e})") from e
      return records
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return records


class _Record:
  """One annotation record, with errors that say where it came from."""

  def __init__(self, record: Any, path: str, index: int):
    self.path, self.index = path, index
    if not isinstance(record, dict):
      raise DataError(f"{path}: record {index}: expected an object, got {type(record).__name__}")
    self.data = record
    self.id = str(record.get("id", record.get("video_id", record.get("videoid", index))))

  def error(self, message: str) -> DataError:
    return DataError(f"{self.path}: record {self.index} (id {self.id}): {message}")

  def get(self, name: str, kind: type | tuple[type, ...] = str, *, where: Any = None,
          label: str | None = None) -> Any:
    """Field `name` of the record (or of `where`, a part of it), checked for type.
    `label` names the field in errors (default: `name`)."""
    data = self.data if where is None else where
    label = label or name
    if not isinstance(data, dict) or name not in data or data[name] in (None, ""):
      raise self.error(f"missing field '{label}'")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
      raise self.error(f"field '{label}' should be {_kind_name(kind)}, got {value!r}")
    return value

  def seconds(self, name: str, *, where: Any = None, label: str | None = None) -> float:
    value = self.get(name, (int, float, str), where=where, label=label)
    try:
      return float(value)
    except ValueError:
      raise self.error(
          f"field '{label or name}' should be a number of seconds, got {value!r}") from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  return " or ".join(k.__name__ for k in kinds)


def _media_path(root: str, relative: str) -> str:
  return relative if os.path.isabs(relative) else os.path.join(root, relative)


def _strip_media_tags(text: str) -> str:
  for tag in _MEDIA_TAGS:
    text = text.replace(tag, "")
  return text.strip()


# ---------------------------------------------------------------------------------------
# The formats. Each parser turns one record into a Sample (or raises DataError).


def _parse_llava(rec: _Record, media_root: str) -> Sample:
  if "image" in rec.data:
    media, relative = "image", rec.get("image")
  elif "video" in rec.data:
    media, relative = "video", rec.get("video")
  else:
    raise rec.error("missing field 'image' or 'video'")
  turns = rec.get("conversations", list)
  if len(turns) < 2 or len(turns) % 2:
    raise rec.error(f"field 'conversations' should alternate human and gpt turns, "
                    f"got {len(turns)} turns")
  values = []
  for j, turn in enumerate(turns):
    role = "human" if j % 2 == 0 else "gpt"
    if rec.get("from", where=turn, label=f"conversations[{j}].from") != role:
      raise rec.error(f"field 'conversations[{j}].from' should be '{role}'")
    values.append(rec.get("value", where=turn, label=f"conversations[{j}].value"))
  exchanges = []
  for i in range(0, len(turns), 2):
    question = _strip_media_tags(values[i])
    answer = values[i + 1].strip()
    # Frames go before the first question (the paper's layout), whatever the tag's place.
    exchanges.append(Exchange(question, answer, WHOLE if i == 0 else None))
  return Sample(rec.id, rec.path, rec.index, media, _media_path(media_root, relative),
                tuple(exchanges))


def _parse_webvid(rec: _Record, media_root: str) -> Sample:
  caption = rec.get("name").strip()
  if rec.data.get("video"):
    relative = rec.get("video")
  else:
    relative = os.path.join(rec.get("page_dir"), f"{rec.get('videoid', (str, int))}.mp4")
  return Sample(rec.id, rec.path, rec.index, "video", _media_path(media_root, relative),
                (Exchange(VIDEO_CAPTION_PROMPT, caption, WHOLE),))


def _parse_scenewalk(rec: _Record, media_root: str) -> Sample:
  relative = rec.get("video")
  segments = rec.get("segments", list)
  if not segments:
    raise rec.error("field 'segments' is empty")
  duration = rec.seconds("duration") if "duration" in rec.data else None
  exchanges = []
  for i, segment in enumerate(segments):
    start = rec.seconds("start", where=segment, label=f"segments[{i}].start")
    end = rec.seconds("end", where=segment, label=f"segments[{i}].end")
    caption = rec.get("caption", where=segment, label=f"segments[{i}].caption").strip()
    if not 0 <= start < end:
      raise rec.error(f"segments[{i}] has bad times start={start} end={end}")
    if duration is not None and end > duration + TIME_TOLERANCE:
      raise rec.error(f"segments[{i}] ends at {end}s, outside the video (duration {duration}s)")
    exchanges.append(Exchange("", caption, (start, end)))
  return Sample(rec.id, rec.path, rec.index, "video", _media_path(media_root, relative),
                tuple(exchanges))


_PARSERS: dict[str, Callable[[_Record, str], Sample]] = {
    "llava": _parse_llava,
    "webvid": _parse_webvid,
    "scenewalk": _parse_scenewalk,
}
FORMATS = tuple(_PARSERS)


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
  """Parses an annotation file of format `fmt` (one of FORMATS) into samples.

  media_root: folder that relative media paths are under (default: the file's folder).
  pack_per_video: merge all records of a video into samples of up to `qa_per_sample`
  exchanges (all of them when None).
  """
  if fmt not in _PARSERS:
    raise ValueError(f"unknown annotation format {fmt!r}; expected one of {FORMATS}")
  annotations = os.fspath(annotations)
  media_root = os.fspath(media_root) or os.path.dirname(os.path.abspath(annotations))
  samples, skipped = [], []
  for index, record in enumerate(load_records(annotations)):
    try:
      samples.append(_PARSERS[fmt](_Record(record, annotations, index), media_root))
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


def read_videomme(annotations: str, video_root: str = "") -> list[MCQuestion]:
  """Multiple-choice questions in the Video-MME layout; videos at `video_root/{videoID}.mp4`."""
  annotations = os.fspath(annotations)
  video_root = os.fspath(video_root) or os.path.dirname(os.path.abspath(annotations))
  questions = []
  for index, record in enumerate(load_records(annotations)):
    rec = _Record(record, annotations, index)
    rec.id = str(record.get("question_id", rec.id)) if isinstance(record, dict) else rec.id
    options = rec.get("options", list)
    answer = rec.get("answer")
    letters = [str(o).split(".", 1)[0].strip() for o in options]
    if answer not in letters:
      raise rec.error(f"answer {answer!r} is not one of the options' letters {letters}")
    questions.append(MCQuestion(
        question_id=rec.get("question_id"), video_id=rec.get("video_id"),
        path=_media_path(video_root, rec.get("videoID") + ".mp4"),
        duration=rec.get("duration"), task_type=str(record.get("task_type", "")),
        question=rec.get("question"), options=tuple(str(o) for o in options), answer=answer))
  return questions
