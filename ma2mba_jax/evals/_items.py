"""The questions a benchmark module reads (`MCItem`, `OpenItem`) and the checks its readers
share: option letters, a video that must exist, a video found by name."""

from __future__ import annotations

import dataclasses
import os
import re

from ma2mba_jax.data.formats import Record

LETTERS = "ABCDEFGHIJ"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")


@dataclasses.dataclass(frozen=True)
class MCItem:
  """A multiple-choice question. options: ("A. ...", "B. ...", ...); answer: a letter."""
  question_id: str
  video: str
  question: str
  options: tuple[str, ...]
  answer: str
  group: str  # duration group ('short', '8-15s', ...)

  @property
  def letters(self) -> tuple[str, ...]:
    return tuple(LETTERS[:len(self.options)])

  def option_text(self, letter: str) -> str:
    """The option's text without its "X. " prefix."""
    option = self.options[self.letters.index(letter)]
    return re.sub(rf"^\s*\(?{letter}[\.\):]\s*", "", option, count=1).strip()


@dataclasses.dataclass(frozen=True)
class OpenItem:
  """An open-ended question with its reference answer."""
  question_id: str
  video: str
  question: str
  answer: str
  group: str  # question / answer type name


def check_video(rec: Record, path: str, field: str) -> str:
  """`path`, or the record's error naming `field` when no such file exists."""
  if not os.path.isfile(path):
    raise rec.error(f"video file {path} (field '{field}') not found")
  return path


def find_video(video_root: str, name: str) -> str | None:
  """video_root/{name} or video_root/v_{name} with one of VIDEO_EXTENSIONS (None: none)."""
  for stem in (name, name if name.startswith("v_") else f"v_{name}"):
    for ext in VIDEO_EXTENSIONS:
      path = os.path.join(video_root, stem + ext)
      if os.path.isfile(path):
        return path
  return None
