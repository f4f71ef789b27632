"""What every annotation format shares: the `Sample` it parses a record into, reading a
record file, and `Record`, a record whose errors name the file, the record index and id,
and the field."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from ma2mba_jax.data.errors import DataError

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


class Record:
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


def media_path(root: str, relative: str) -> str:
  """`relative` under `root` (an absolute path stays as it is)."""
  return relative if os.path.isabs(relative) else os.path.join(root, relative)


def strip_media_tags(text: str) -> str:
  """The text without <image> / <video> tags, stripped."""
  for tag in _MEDIA_TAGS:
    text = text.replace(tag, "")
  return text.strip()
