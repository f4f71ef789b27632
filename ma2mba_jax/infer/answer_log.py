"""A JSONL file of per-question evaluation records, appended as answers come, resumable.

Line 1 is {"header": {...}}: what produced the answers (benchmark, annotations, methods,
the model's checkpoint and reading settings). Every later line is one answered question's
record ({"question_id", "video", ...}, as evaluate.py builds them). An evaluation that dies
keeps every answer written before it died; opened again with the same header, the file
gives those answers back and the evaluation asks only the rest. A different header is an
error (the answers would mix two evaluations). A last line cut short by a kill is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ma2mba_jax.data.errors import DataError

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


def record_key(question_id: Any, video: str, occurrence: int = 0) -> Key:
  """What identifies a question across runs: its id, its video's file name (so a moved
  video folder still resumes) and, for a repeated (id, video), which repeat it is."""
  return (str(question_id), os.path.basename(video), int(occurrence))


def _key_of(record: dict[str, Any]) -> Key:
  return record_key(record["question_id"], record["video"], record.get("occurrence", 0))


class AnswerLog:
  """Open with `AnswerLog.open(path, header)`; `answers` holds the records read back."""

  def __init__(self, path: str, answers: dict[Key, dict[str, Any]], file):
    self.path, self.answers, self._file = path, answers, file

  @classmethod
  def open(cls, path: str, header: dict[str, Any]) -> AnswerLog:
    path = os.fspath(path)
    header = json.loads(json.dumps(header))  # as it reads back (tuples -> lists, ...)
    answers: dict[Key, dict[str, Any]] = {}
    if os.path.isfile(path):
      _drop_torn_tail(path)
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
      first = _parse(path, 1, lines[0]) if lines else {}
      if not isinstance(first, dict) or "header" not in first:
        raise DataError(f"{path}: not an evaluate answers file (line 1 has no 'header'); "
                        "pass another --records path or remove it")
      changed = sorted(k for k in set(header) | set(first["header"])
                       if header.get(k) != first["header"].get(k))
      if changed:
        diffs = "; ".join(f"{k}: {first['header'].get(k)!r} in the file, {header.get(k)!r} now"
                          for k in changed)
        raise DataError(f"{path}: holds answers of a different evaluation ({diffs}); pass "
                        "another --records/--json path or remove the file to start over")
      for number, line in enumerate(lines[1:], 2):
        record = _parse(path, number, line)
        if not isinstance(record, dict) or "question_id" not in record or "video" not in record:
          raise DataError(f"{path}: line {number} is not a question's record")
        answers[_key_of(record)] = record
      log.info("%s: resuming after %d answered questions", path, len(answers))
      file = open(path, "a", encoding="utf-8")
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      file = open(path, "w", encoding="utf-8")
      file.write(json.dumps({"header": header}) + "\n")
      file.flush()
    return cls(path, answers, file)

  def add(self, records: list[dict[str, Any]]) -> None:
    """Appends answered questions' records and puts them on disk before returning."""
    for record in records:
      self._file.write(json.dumps(record) + "\n")
      self.answers[_key_of(record)] = record
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> AnswerLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _parse(path: str, number: int, line: str) -> Any:
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: line {number} is not valid JSON ({e})") from e


def _drop_torn_tail(path: str) -> None:
  """Cuts a last line that has no newline (a write stopped by a kill) off the file."""
  with open(path, "rb+") as f:
    data = f.read()
    if data.endswith(b"\n"):
      return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping a last line cut short (%d bytes)", path, len(data) - keep)
    f.truncate(keep)
