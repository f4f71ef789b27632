"""ActivityNet-QA (open-ended): a questions file [{video_name, question, question_id}] and an
answers file [{question_id, answer, type}] matched by question_id (default: the questions
file with _q.json -> _a.json); the video is video_root/{video_name}.{mp4,mkv,webm} (or
v_{video_name}.*), video_root defaulting to the questions file's folder. Scored by exact
match and token F1 against the reference (no LLM judge)."""

from __future__ import annotations

import os
import re

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.formats import Record, load_records
from ma2mba_jax.evals import VIDEO_EXTENSIONS, OpenItem, find_video

KIND = "open_ended"
# 'type' -> name (its README: question types 0-2, answer types 3-8).
TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes/no", 4: "color", 5: "object",
         6: "location", 7: "number", 8: "other"}
GROUPS = tuple(TYPES.values())


def read_items(annotations: str, *, video_root: str = "", answers: str = "") -> list[OpenItem]:
  """ActivityNet-QA questions + answers files -> OpenItems (group = the answer's type)."""
  questions = os.fspath(annotations)
  if not answers:
    answers = re.sub(r"_q\.json$", "_a.json", questions)
    if answers == questions:
      raise DataError(f"{questions}: give the answers file (--answers) for ActivityNet-QA")
  answers = os.fspath(answers)
  video_root = os.fspath(video_root) or os.path.dirname(os.path.abspath(questions))
  references: dict[str, tuple[str, str]] = {}
  for index, record in enumerate(load_records(answers)):
    rec = Record(record, answers, index)
    rec.id = str(record.get("question_id", index))
    qid = str(rec.get("question_id", (str, int)))
    answer = rec.get("answer", (str, int, float))
    kind = record.get("type")
    group = TYPES.get(kind, str(kind)) if kind is not None else "all"
    references[qid] = (str(answer), group)
  items = []
  for index, record in enumerate(load_records(questions)):
    rec = Record(record, questions, index)
    rec.id = str(record.get("question_id", index))
    qid = str(rec.get("question_id", (str, int)))
    if qid not in references:
      raise rec.error(f"question_id {qid!r} has no answer in {answers}")
    name = str(rec.get("video_name", (str, int)))
    path = find_video(video_root, name)
    if path is None:
      raise rec.error(f"no video for video_name {name!r} under {video_root} (tried "
                      f"{name} and v_{name} with {', '.join(VIDEO_EXTENSIONS)})")
    answer, group = references[qid]
    items.append(OpenItem(qid, path, rec.get("question"), answer, group))
  return items
