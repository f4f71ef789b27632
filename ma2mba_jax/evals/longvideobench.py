"""LongVideoBench (multiple choice): lvb_val.json records with video_path (under video_root,
default <annotations dir>/videos), question, candidates [str], correct_choice (int index),
id, duration_group (15 | 60 | 600 | 3600: the upper bound in seconds of the groups 8-15 s,
15-60 s, 180-600 s, 900-3600 s) and duration."""

from __future__ import annotations

import os

from ma2mba_jax.data.formats import Record, load_records
from ma2mba_jax.evals import LETTERS, MCItem, check_video

KIND = "multiple_choice"
# duration_group value -> the group's name.
DURATION_GROUPS = {15: "8-15s", 60: "15-60s", 600: "180-600s", 3600: "900-3600s"}
GROUPS = tuple(DURATION_GROUPS.values())
LIKELIHOOD_TARGET = "letter"


def read_items(annotations: str, *, video_root: str = "", answers: str = "") -> list[MCItem]:
  """LongVideoBench records (lvb_val.json) -> MCItems (group from duration_group)."""
  del answers  # one file holds the answers
  annotations = os.fspath(annotations)
  video_root = os.fspath(video_root) or os.path.join(
      os.path.dirname(os.path.abspath(annotations)), "videos")
  items = []
  for index, record in enumerate(load_records(annotations)):
    rec = Record(record, annotations, index)
    candidates = rec.get("candidates", list)
    if not 2 <= len(candidates) <= len(LETTERS):
      raise rec.error(f"field 'candidates' should hold 2 to {len(LETTERS)} options, "
                      f"got {len(candidates)}")
    for j, candidate in enumerate(candidates):
      if not isinstance(candidate, (str, int, float)) or isinstance(candidate, bool):
        raise rec.error(f"field 'candidates[{j}]' should be text, got {candidate!r}")
    correct = rec.get("correct_choice", int)
    if not 0 <= correct < len(candidates):
      raise rec.error(f"field 'correct_choice' = {correct} is not an index into the "
                      f"{len(candidates)} candidates")
    group_value = rec.get("duration_group", (int, float, str))
    try:
      group = DURATION_GROUPS.get(int(float(group_value)), f"{group_value}s")
    except ValueError:
      raise rec.error(f"field 'duration_group' should be a number of seconds, "
                      f"got {group_value!r}") from None
    path = rec.get("video_path")
    path = path if os.path.isabs(path) else os.path.join(video_root, path)
    options = tuple(f"{LETTERS[j]}. {c}" for j, c in enumerate(candidates))
    items.append(MCItem(str(record.get("id", index)), check_video(rec, path, "video_path"),
                        rec.get("question"), options, LETTERS[correct], group))
  return items
