"""Score a checkpoint on a video benchmark from local annotation files.

  python -m ma2mba_jax.evaluate --checkpoint=runs/demo/stage3 --benchmark=synthetic \
      --annotations=runs/demo/data --method=both --json=runs/demo/eval.json
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=videomme \
      --annotations=videomme.json --video_root=videos/ [--limit=100]
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=longvideobench \
      --annotations=LongVideoBench/lvb_val.json [--video_root=LongVideoBench/videos]
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=activitynetqa \
      --annotations=test_q.json --answers=test_a.json --video_root=videos/

Layouts, answer parsing and scoring: ma2mba_jax/evals/ (one module per benchmark; adding a
file there adds a benchmark). Multiple choice is answered by option likelihood and/or by
generation (infer/answering.py says how); open-ended questions by greedy generation, scored
by exact match and token F1 (no LLM judge). Each video is read once for all its questions.
The results table (accuracy with the chance level beside it and the one-sided p-value of
doing that well by guessing, overall and by duration group) is printed last; --json writes
it with every question's record.

Each video's answers are appended to --records (default: beside --json, X.json ->
X.records.jsonl; infer/answer_log.py) as soon as they are given. A run that stops keeps them;
the same command again asks only the questions not answered yet, and its table covers all
answers. A video that cannot be read stops the run with one line naming it (the answers so
far stay in the records file), or, with --skip_bad, is skipped: its questions are counted
as skipped and left out of the table (a later run tries them again).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from absl import app, flags, logging

from ma2mba_jax import evals
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.evals import MCItem, OpenItem
from ma2mba_jax.infer import answering, model_flags
from ma2mba_jax.infer.answer_log import AnswerLog, record_key
from ma2mba_jax.reporting import environment, print_table, write_json

flags.adopt_module_key_flags(model_flags)  # --help lists the shared flags too
_BENCHMARK = flags.DEFINE_string("benchmark", None, "Benchmark: a module of ma2mba_jax/evals/ "
                                 f"({', '.join(evals.names())}).")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "Annotation file (ActivityNet-QA: the "
                                   "questions file; synthetic: the dataset folder or its "
                                   "manifest.json).")
_ANSWERS = flags.DEFINE_string("answers", "", "ActivityNet-QA answers file (default: the "
                               "questions file with _q.json -> _a.json).")
_VIDEO_ROOT = flags.DEFINE_string("video_root", "", "Folder of the videos (default: per "
                                  "benchmark, see its module in ma2mba_jax/evals/).")
_METHOD = flags.DEFINE_enum("method", "both",
                            ["likelihood", "generate", "generate_text", "both", "all"],
                            "Multiple choice: answer by option likelihood, generation (the "
                            "letter after the multiple-choice prompt), generate_text (a free "
                            "answer to the question alone, matched to the options' text), "
                            "both (likelihood and generate) or all three.")
_TARGET = flags.DEFINE_enum("likelihood_target", None, ["letter", "text"],
                            "What an option's likelihood scores: its letter after the "
                            "multiple-choice prompt, or its text as the answer to the bare "
                            "question (a cloze test; infer/answering.py). Default: the "
                            "benchmark module's LIKELIHOOD_TARGET (text for the synthetic set, "
                            "as the demo scores it; letter for the others).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_RECORDS = flags.DEFINE_string("records", "", "JSONL of per-question records, appended as "
                               "each video is answered; an existing one is resumed (default: "
                               "beside --json, X.json -> X.records.jsonl; none without --json).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Skip (and count) a video that cannot be "
                              "read instead of stopping.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N questions.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Longest generated answer "
                                       "(default: 8 for multiple choice, 64 open-ended).")


class Answerer(Protocol):
  """What answers the questions (answering.ModelAnswerer; tests use stubs)."""

  def answer_mc(self, video: str, items: Sequence[MCItem], methods: Sequence[str]
                ) -> list[dict[str, Any]]: ...

  def answer_open(self, video: str, items: Sequence[OpenItem]) -> list[str]: ...

  # Optional (ModelAnswerer has them): `upcoming(videos)` is told the videos in the order
  # they will be answered, before the first (so it can decode the next one ahead), and
  # `close()` is called when evaluation ends.


def _mc_records(video: str, group: Sequence[MCItem], answerer: Answerer,
                methods: Sequence[str]) -> list[dict[str, Any]]:
  """The records of one video's multiple-choice questions."""
  results = answerer.answer_mc(video, group, methods)
  if len(results) != len(group):
    raise RuntimeError(f"the answerer returned {len(results)} results for {len(group)} "
                       f"questions about {video}")
  records = []
  for item, result in zip(group, results):
    record = {"question_id": item.question_id, "video": item.video, "group": item.group,
              "answer": item.answer, "num_options": len(item.options)}
    for method in methods:
      record[method] = {**result[method], "correct": result[method]["choice"] == item.answer}
    records.append(record)
  return records


def _open_records(video: str, group: Sequence[OpenItem], answerer: Answerer
                  ) -> list[dict[str, Any]]:
  """The records of one video's open-ended questions."""
  predictions = answerer.answer_open(video, group)
  return [{"question_id": item.question_id, "video": item.video, "group": item.group,
           "question": item.question, "answer": item.answer, "prediction": prediction,
           "exact_match": evals.exact_match(prediction, item.answer),
           "f1": evals.token_f1(prediction, item.answer)}
          for item, prediction in zip(group, predictions, strict=True)]


def _keys(items) -> list[tuple[str, str, int]]:
  """record_key of each item; a repeated (question id, video) counts its repeats."""
  seen: dict[tuple[str, str, int], int] = {}
  keys = []
  for item in items:
    base = record_key(item.question_id, item.video)
    keys.append(record_key(item.question_id, item.video, seen.get(base, 0)))
    seen[base] = seen.get(base, 0) + 1
  return keys


def records_path_for(json_path: str | None) -> str | None:
  """The default --records: X.json -> X.records.jsonl beside it (None without a JSON)."""
  if not json_path:
    return None
  stem = json_path[:-len(".json")] if json_path.endswith(".json") else json_path
  return stem + ".records.jsonl"


def _print_report(report: dict[str, Any]) -> None:
  if report["kind"] == "open_ended":
    print(f"NOTE: {evals.NO_JUDGE_NOTE}")
    rows = [{"group": r["group"], "n": r["n"], "exact match %": f"{r['exact_match']:.1f}",
             "token F1 %": f"{r['f1']:.1f}"} for r in report["rows"]]
  else:
    target = report.get("likelihood_target")
    label = lambda m: f"{m} ({target})" if m == "likelihood" and target else m
    rows = [{"method": label(r["method"]), "duration": r["group"], "n": r["n"],
             "correct": r["correct"], "accuracy %": f"{r['accuracy']:.1f}",
             "chance %": f"{r['chance']:.1f}", "p vs chance": f"{r['p_value']:.2g}"}
            for r in report["rows"]]
  print(f"{report['benchmark']}: {report['num_questions']} questions from "
        f"{report['annotations']}")
  if report["num_skipped"]:
    print(f"SKIPPED: {report['num_skipped']} questions of {len(report['skipped'])} unreadable "
          f"video(s) (--skip_bad), not in the table; it covers the {report['num_answered']} "
          "answered")
  print_table(rows, list(rows[0]))


def load_items(benchmark: str, annotations: str, *, video_root: str = "", answers: str = "",
               limit: int | None = None) -> list[MCItem] | list[OpenItem]:
  """The benchmark's questions (the first `limit`), checked, videos included."""
  items = evals.read_items(benchmark, annotations, video_root=video_root, answers=answers)
  items = items[:limit] if limit is not None else items
  if not items:
    raise DataError(f"{annotations}: no questions to evaluate")
  return items


def evaluate_items(benchmark: str, annotations: str, items, *, answerer: Answerer,
                   methods: Sequence[str] = ("likelihood", "generate"),
                   json_path: str | None = None, records_path: str | None = None,
                   skip_bad: bool = False, settings: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Answers the items with `answerer` video by video and scores them; writes JSON, prints
  the table (last). Returns the report: rows (the table), records (one per answered
  question, in the items' order) and skipped (bad videos, under skip_bad).

  records_path (default: records_path_for(json_path)): each video's records are appended
  there as soon as they exist, and questions already in it are not asked again; `settings`
  (what else decides the answers: checkpoint, fps, ...) goes into its header with the
  benchmark, annotations and methods, and must match to resume.
  """
  spec = evals.get(benchmark)
  multiple_choice = spec.multiple_choice
  methods = list(methods) if multiple_choice else ["generate"]
  target = getattr(answerer, "target", None) if multiple_choice else None
  records_path = records_path or records_path_for(json_path)
  header = {"benchmark": benchmark, "annotations": os.path.abspath(annotations),
            "methods": methods, "likelihood_target": target, **(settings or {})}
  keys = _keys(items)
  videos: dict[str, list[tuple[Any, Any]]] = {}
  for key, item in zip(keys, items):
    videos.setdefault(item.video, []).append((key, item))
  log = AnswerLog.open(records_path, header) if records_path else None
  answers = dict(log.answers) if log else {}
  skipped: list[dict[str, Any]] = []
  if hasattr(answerer, "upcoming"):
    answerer.upcoming([video for video, pairs in videos.items()
                       if any(key not in answers for key, _ in pairs)])
  try:
    for index, (video, pairs) in enumerate(videos.items(), 1):
      todo = [(key, item) for key, item in pairs if key not in answers]
      if not todo:
        continue
      logging.info("video %d/%d: %s (%d questions)", index, len(videos), video, len(todo))
      group = [item for _, item in todo]
      try:
        new = (_mc_records(video, group, answerer, methods) if multiple_choice
               else _open_records(video, group, answerer))
      except DataError as e:
        if not skip_bad:
          kept = f"; the {len(answers)} answers so far are in {records_path}" if log else ""
          raise DataError(f"{e} (while answering {len(todo)} questions about it{kept}; "
                          "--skip_bad skips such videos)") from e
        logging.warning("skip_bad: skipped %s (%d questions): %s", video, len(todo), e)
        skipped.append({"video": video, "questions": len(todo), "error": str(e)})
        continue
      for (key, _), record in zip(todo, new, strict=True):
        if key[2]:
          record["occurrence"] = key[2]
        answers[key] = record
      if log:
        log.add(new)
  finally:
    if log:
      log.close()
    if hasattr(answerer, "close"):
      answerer.close()
  records = [answers[key] for key in keys if key in answers]
  num_skipped = sum(s["questions"] for s in skipped)
  if not records:
    raise DataError(f"{annotations}: no question was answered: all {len(videos)} videos "
                    f"failed (first: {skipped[0]['error'] if skipped else '?'})")
  report: dict[str, Any] = {"benchmark": benchmark, "annotations": os.fspath(annotations),
                            "num_questions": len(items), "num_answered": len(records),
                            "num_skipped": num_skipped, "skipped": skipped,
                            "records_file": records_path}
  if multiple_choice:
    report.update(kind="multiple_choice", methods=methods, likelihood_target=target,
                  rows=evals.accuracy_rows(records, methods, spec.groups), records=records)
  else:
    report.update(kind="open_ended", methods=methods, note=evals.NO_JUDGE_NOTE,
                  rows=evals.open_ended_rows(records, spec.groups), records=records)
  report["environment"] = environment()
  write_json(json_path, report)
  _print_report(report)
  return report


def run(benchmark: str, annotations: str, *, answerer: Answerer, video_root: str = "",
        answers: str = "", methods: Sequence[str] = ("likelihood", "generate"),
        limit: int | None = None, json_path: str | None = None,
        records_path: str | None = None, skip_bad: bool = False,
        settings: dict[str, Any] | None = None) -> dict[str, Any]:
  """load_items, then evaluate_items."""
  items = load_items(benchmark, annotations, video_root=video_root, answers=answers,
                     limit=limit)
  return evaluate_items(benchmark, annotations, items, answerer=answerer, methods=methods,
                        json_path=json_path, records_path=records_path, skip_bad=skip_bad,
                        settings=settings)


def main(argv):
  del argv
  for name in ("checkpoint", "benchmark", "annotations"):  # checkpoint: infer/model_flags.py
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if _BENCHMARK.value not in evals.names():
    raise app.UsageError(f"--benchmark={_BENCHMARK.value}: no such benchmark; expected one "
                         f"of {', '.join(evals.names())} (modules of ma2mba_jax/evals/)")
  if not evals.get(_BENCHMARK.value).multiple_choice and _METHOD.value == "likelihood":
    raise app.UsageError(f"{_BENCHMARK.value} is open-ended: it is answered by generation, "
                         "not option likelihood")
  try:
    _evaluate_checkpoint()
  except (DataError, FileNotFoundError) as e:  # bad input: the message names it
    sys.exit(f"evaluate: error: {e}")


def likelihood_target(benchmark: str) -> str:
  """--likelihood_target, or the benchmark's default when it is not given."""
  if _TARGET.value is not None:
    return _TARGET.value
  return evals.get(benchmark).likelihood_target or "letter"


def _evaluate_checkpoint() -> None:
  # The annotations first: a bad record fails before the model loads.
  items = load_items(_BENCHMARK.value, _ANNOTATIONS.value, video_root=_VIDEO_ROOT.value,
                     answers=_ANSWERS.value, limit=_LIMIT.value)
  model, tokenizer = model_flags.load_model()
  max_new = _MAX_NEW_TOKENS.value
  answerer = answering.ModelAnswerer.create(
      model, tokenizer, fps=model_flags.FPS.value, max_frames=model_flags.MAX_FRAMES.value,
      frames_per_step=model_flags.FRAMES_PER_STEP.value,
      target=likelihood_target(_BENCHMARK.value),
      mc_max_new_tokens=max_new or 8, open_max_new_tokens=max_new or 64,
      progress=lambda video: answering.progress_printer(f"reading {os.path.basename(video)}"))
  methods = {"both": answering.METHODS, "all": answering.MC_METHODS}.get(
      _METHOD.value, (_METHOD.value,))
  # What else decides the answers: a records file made with other values is not resumed.
  settings = {"checkpoint": os.path.abspath(model_flags.CHECKPOINT.value),
              "fps": model_flags.FPS.value, "max_frames": model_flags.MAX_FRAMES.value,
              "max_new_tokens": max_new, "compute_dtype": model_flags.COMPUTE_DTYPE.value,
              "param_dtype": model_flags.PARAM_DTYPE.value,
              "ssd_impl": model.config.ssd_impl,  # the backend it runs (auto read)
              "tokenizer": model_flags.TOKENIZER.value}
  evaluate_items(_BENCHMARK.value, _ANNOTATIONS.value, items, answerer=answerer,
                 methods=methods, json_path=_JSON.value,
                 records_path=_RECORDS.value or None, skip_bad=_SKIP_BAD.value,
                 settings=settings)


if __name__ == "__main__":
  app.run(main)
