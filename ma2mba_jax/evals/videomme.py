"""Video-MME (multiple choice): the layout `data.formats.read_videomme` reads, videos at
video_root/{videoID}.mp4; group = the record's duration, 'short' | 'medium' | 'long' (the
paper's S / M / L columns)."""

from __future__ import annotations

import os

from ma2mba_jax.data.formats import Record, read_videomme
from ma2mba_jax.evals import LETTERS, MCItem, check_video

KIND = "multiple_choice"
GROUPS = ("short", "medium", "long")
LIKELIHOOD_TARGET = "letter"


def read_items(annotations: str, *, video_root: str = "", answers: str = "") -> list[MCItem]:
  """Video-MME layout -> MCItems (group = the record's duration)."""
  del answers  # one file holds the answers
  questions = read_videomme(annotations, video_root)
  items = []
  for index, q in enumerate(questions):
    rec = Record({"id": q.question_id}, os.fspath(annotations), index)
    if len(q.options) > len(LETTERS):
      raise rec.error(f"{len(q.options)} options; at most {len(LETTERS)} are supported")
    expected = list(LETTERS[:len(q.options)])
    got = [str(o).split(".", 1)[0].strip() for o in q.options]
    if got != expected:
      raise rec.error(f"field 'options' should be lettered {expected} in order, got {got}")
    items.append(MCItem(q.question_id, check_video(rec, q.path, "videoID"), q.question,
                        q.options, q.answer, q.duration))
  return items
