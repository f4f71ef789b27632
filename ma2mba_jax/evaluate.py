"""Score a checkpoint on a video benchmark from local annotation files.

  python -m ma2mba_jax.evaluate --checkpoint=runs/demo/stage3 --benchmark=synthetic \
      --annotations=runs/demo/data --method=both --json=runs/demo/eval.json
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=videomme \
      --annotations=videomme.json --video_root=videos/ [--limit=100]
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=longvideobench \
      --annotations=LongVideoBench/lvb_val.json [--video_root=LongVideoBench/videos]
  python -m ma2mba_jax.evaluate --checkpoint=WORKDIR --benchmark=activitynetqa \
      --annotations=test_q.json --answers=test_a.json --video_root=videos/

Layouts, answer parsing and scoring: infer/benchmarks.py. Multiple choice is answered by
option likelihood and/or by generation (infer/answering.py says how); open-ended questions by
greedy generation, scored by exact match and token F1 (no LLM judge). Each video is read once
for all its questions. The results table (accuracy with the chance level beside it and the
one-sided p-value of doing that well by guessing, overall and by duration group) is printed
last; --json writes it with every question's record.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from absl import app, flags, logging

from ma2mba_jax.bench.common import environment, print_table, write_json
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.infer import answering, benchmarks, checkpoint
from ma2mba_jax.infer.benchmarks import MCItem, OpenItem

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trainer workdir or model export folder.")
_BENCHMARK = flags.DEFINE_enum("benchmark", None, list(benchmarks.BENCHMARKS), "Benchmark.")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "Annotation file (ActivityNet-QA: the "
                                   "questions file; synthetic: the dataset folder or its "
                                   "manifest.json).")
_ANSWERS = flags.DEFINE_string("answers", "", "ActivityNet-QA answers file (default: the "
                               "questions file with _q.json -> _a.json).")
_VIDEO_ROOT = flags.DEFINE_string("video_root", "", "Folder of the videos (default: per "
                                  "benchmark, see infer/benchmarks.py).")
_METHOD = flags.DEFINE_enum("method", "both", ["likelihood", "generate", "both"],
                            "Multiple choice: answer by option likelihood, generation, or both.")
_TARGET = flags.DEFINE_enum("likelihood_target", None, ["letter", "text"],
                            "What an option's likelihood scores: its letter after the "
                            "multiple-choice prompt, or its text as the answer to the bare "
                            "question (a cloze test; infer/answering.py). Default: text for "
                            "the synthetic set (as the demo scores it), letter otherwise.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N questions.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer.json (default: from the "
                                 "checkpoint's config.json).")
_FPS = flags.DEFINE_float("fps", 1.0, "Frames per second read from each video.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "At most this many frames per video, "
                                   "spread evenly (default: all).")
_FRAMES_PER_STEP = flags.DEFINE_integer("frames_per_step", 16, "Frames encoded per step.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Longest generated answer "
                                       "(default: 8 for multiple choice, 64 open-ended).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "", ["", "float32", "bfloat16"],
                                   "Override the checkpoint's compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "", ["", "bfloat16"],
                                 "Store weight matrices in bf16 (default: f32).")


class Answerer(Protocol):
  """What answers the questions (answering.ModelAnswerer; tests use stubs)."""

  def answer_mc(self, video: str, items: Sequence[MCItem], methods: Sequence[str]
                ) -> list[dict[str, Any]]: ...

  def answer_open(self, video: str, items: Sequence[OpenItem]) -> list[str]: ...


def _by_video(items):
  """Items grouped by video, videos in order of first appearance."""
  groups: dict[str, list] = {}
  for item in items:
    groups.setdefault(item.video, []).append(item)
  return groups


def _mc_records(items: Sequence[MCItem], answerer: Answerer, methods: Sequence[str]
                ) -> list[dict[str, Any]]:
  records = []
  videos = _by_video(items)
  for index, (video, group) in enumerate(videos.items(), 1):
    logging.info("video %d/%d: %s (%d questions)", index, len(videos), video, len(group))
    results = answerer.answer_mc(video, group, methods)
    if len(results) != len(group):
      raise RuntimeError(f"the answerer returned {len(results)} results for {len(group)} "
                         f"questions about {video}")
    for item, result in zip(group, results):
      record = {"question_id": item.question_id, "video": item.video, "group": item.group,
                "answer": item.answer, "num_options": len(item.options)}
      for method in methods:
        record[method] = {**result[method], "correct": result[method]["choice"] == item.answer}
      records.append(record)
  return records


def _open_records(items: Sequence[OpenItem], answerer: Answerer) -> list[dict[str, Any]]:
  records = []
  videos = _by_video(items)
  for index, (video, group) in enumerate(videos.items(), 1):
    logging.info("video %d/%d: %s (%d questions)", index, len(videos), video, len(group))
    predictions = answerer.answer_open(video, group)
    for item, prediction in zip(group, predictions, strict=True):
      records.append({"question_id": item.question_id, "video": item.video,
                      "group": item.group, "question": item.question, "answer": item.answer,
                      "prediction": prediction,
                      "exact_match": benchmarks.exact_match(prediction, item.answer),
                      "f1": benchmarks.token_f1(prediction, item.answer)})
  return records


def _print_report(report: dict[str, Any]) -> None:
  if report["kind"] == "open_ended":
    print(f"NOTE: {benchmarks.NO_JUDGE_NOTE}")
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
  print_table(rows, list(rows[0]))


def load_items(benchmark: str, annotations: str, *, video_root: str = "", answers: str = "",
               limit: int | None = None) -> list[MCItem] | list[OpenItem]:
  """The benchmark's questions (the first `limit`), checked, videos included."""
  items = benchmarks.read_items(benchmark, annotations, video_root=video_root, answers=answers)
  items = items[:limit] if limit is not None else items
  if not items:
    raise DataError(f"{annotations}: no questions to evaluate")
  return items


def evaluate_items(benchmark: str, annotations: str, items, *, answerer: Answerer,
                   methods: Sequence[str] = ("likelihood", "generate"),
                   json_path: str | None = None) -> dict[str, Any]:
  """Answers the items with `answerer` and scores them; writes JSON, prints the table
  (last). Returns the report: rows (the table) and records (one per question)."""
  report: dict[str, Any] = {"benchmark": benchmark, "annotations": os.fspath(annotations),
                            "num_questions": len(items)}
  if benchmark in benchmarks.MULTIPLE_CHOICE:
    records = _mc_records(items, answerer, methods)
    report.update(kind="multiple_choice", methods=list(methods),
                  likelihood_target=getattr(answerer, "target", None),
                  rows=benchmarks.accuracy_rows(records, methods), records=records)
  else:
    records = _open_records(items, answerer)
    report.update(kind="open_ended", methods=["generate"], note=benchmarks.NO_JUDGE_NOTE,
                  rows=benchmarks.open_ended_rows(records), records=records)
  report["environment"] = environment()
  write_json(json_path, report)
  _print_report(report)
  return report


def run(benchmark: str, annotations: str, *, answerer: Answerer, video_root: str = "",
        answers: str = "", methods: Sequence[str] = ("likelihood", "generate"),
        limit: int | None = None, json_path: str | None = None) -> dict[str, Any]:
  """load_items, then evaluate_items."""
  items = load_items(benchmark, annotations, video_root=video_root, answers=answers,
                     limit=limit)
  return evaluate_items(benchmark, annotations, items, answerer=answerer, methods=methods,
                        json_path=json_path)


def main(argv):
  del argv
  for name in ("checkpoint", "benchmark", "annotations"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if _BENCHMARK.value not in benchmarks.MULTIPLE_CHOICE and _METHOD.value == "likelihood":
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
  return "text" if benchmark == "synthetic" else "letter"


def _evaluate_checkpoint() -> None:
  # The annotations first: a bad record fails before the model loads.
  items = load_items(_BENCHMARK.value, _ANNOTATIONS.value, video_root=_VIDEO_ROOT.value,
                     answers=_ANSWERS.value, limit=_LIMIT.value)
  model, tokenizer = checkpoint.load(_CHECKPOINT.value, tokenizer=_TOKENIZER.value,
                                     compute_dtype=_COMPUTE_DTYPE.value,
                                     param_dtype=_PARAM_DTYPE.value)
  max_new = _MAX_NEW_TOKENS.value
  answerer = answering.ModelAnswerer.create(
      model, tokenizer, fps=_FPS.value, max_frames=_MAX_FRAMES.value,
      frames_per_step=_FRAMES_PER_STEP.value, target=likelihood_target(_BENCHMARK.value),
      mc_max_new_tokens=max_new or 8, open_max_new_tokens=max_new or 64,
      progress=lambda video: answering.progress_printer(f"reading {os.path.basename(video)}"))
  methods = answering.METHODS if _METHOD.value == "both" else (_METHOD.value,)
  evaluate_items(_BENCHMARK.value, _ANNOTATIONS.value, items, answerer=answerer,
                 methods=methods, json_path=_JSON.value)


if __name__ == "__main__":
  app.run(main)
