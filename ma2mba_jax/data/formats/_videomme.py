"""The Video-MME evaluation layout (multiple-choice questions, not a training format):
records with question_id, video_id, videoID (the file video_root/{videoID}.mp4), duration,
task_type, question, options ["A. ...", ...] and answer (a letter)."""

from __future__ import annotations

import os

from ma2mba_jax.data.formats._common import MCQuestion, Record, load_records, media_path


def read_videomme(annotations: str, video_root: str = "") -> list[MCQuestion]:
  """Multiple-choice questions in the Video-MME layout; videos at `video_root/{videoID}.mp4`."""
  annotations = os.fspath(annotations)
  video_root = os.fspath(video_root) or os.path.dirname(os.path.abspath(annotations))
  questions = []
  for index, record in enumerate(load_records(annotations)):
    rec = Record(record, annotations, index)
    rec.id = str(record.get("question_id", rec.id)) if isinstance(record, dict) else rec.id
    options = rec.get("options", list)
    answer = rec.get("answer")
    letters = [str(o).split(".", 1)[0].strip() for o in options]
    if answer not in letters:
      raise rec.error(f"answer {answer!r} is not one of the options' letters {letters}")
    questions.append(MCQuestion(
        question_id=rec.get("question_id"), video_id=rec.get("video_id"),
        path=media_path(video_root, rec.get("videoID") + ".mp4"),
        duration=rec.get("duration"), task_type=str(record.get("task_type", "")),
        question=rec.get("question"), options=tuple(str(o) for o in options), answer=answer))
  return questions
