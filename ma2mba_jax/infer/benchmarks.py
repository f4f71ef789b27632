"""Benchmark annotation layouts, answer parsing and scoring (no model here; see answering.py).

Multiple choice (accuracy, overall and by duration group, chance = mean of 1 / #options):
  videomme        Video-MME layout (formats.read_videomme): video_root/{videoID}.mp4,
                  duration 'short' | 'medium' | 'long' (the paper's S / M / L columns).
  longvideobench  LongVideoBench's lvb_val.json records: video_path (under video_root,
                  default <annotations dir>/videos), question, candidates [str], correct_choice
                  (int index), id, duration_group (15 | 60 | 600 | 3600: the upper bound in
                  seconds of the groups 8-15 s, 15-60 s, 180-600 s, 900-3600 s), duration.
  synthetic       the synthetic eval set (data/synthetic.py): its manifest.json's "eval" entry
                  names a Video-MME-layout file and the video folder.
Open-ended (exact match and token F1 against the reference; no LLM judge, so the paper's
GPT-judged accuracy/score are not comparable):
  activitynetqa   ActivityNet-QA: a questions file [{video_name, question, question_id}] and an
                  answers file [{question_id, answer, type}] matched by question_id; the video
                  is video_root/{video_name}.{mp4,mkv,webm} (or v_{video_name}.*).

Every reader checks the records and that each video exists, raising DataError with the file,
the record index and id, and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.formats import _Record, load_records, read_videomme

BENCHMARKS = ("videomme", "longvideobench", "activitynetqa", "synthetic")
MULTIPLE_CHOICE = ("videomme", "longvideobench", "synthetic")
LETTERS = "ABCDEFGHIJ"
# LongVideoBench duration_group value -> the group's name.
LVB_GROUPS = {15: "8-15s", 60: "15-60s", 600: "180-600s", 3600: "900-3600s"}
# ActivityNet-QA 'type' -> name (its README: question types 0-2, answer types 3-8).
ANETQA_TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes/no", 4: "color",
                5: "object", 6: "location", 7: "number", 8: "other"}
NO_JUDGE_NOTE = ("open-ended answers scored by exact match and token F1 only: there is no LLM "
                 "judge here, so these numbers are not comparable with the paper's GPT-judged "
                 "accuracy / score")
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


# --------------------------------------------------------------------------- layout readers


def _check_video(rec: _Record, path: str, field: str) -> str:
  if not os.path.isfile(path):
    raise rec.error(f"video file {path} (field '{field}') not found")
  return path


def read_videomme_items(annotations: str, video_root: str = "") -> list[MCItem]:
  """Video-MME layout -> MCItems (group = the record's duration)."""
  questions = read_videomme(annotations, video_root)
  items = []
  for index, q in enumerate(questions):
    rec = _Record({"id": q.question_id}, os.fspath(annotations), index)
    if len(q.options) > len(LETTERS):
      raise rec.error(f"{len(q.options)} options; at most {len(LETTERS)} are supported")
    expected = list(LETTERS[:len(q.options)])
    got = [str(o).split(".", 1)[0].strip() for o in q.options]
    if got != expected:
      raise rec.error(f"field 'options' should be lettered {expected} in order, got {got}")
    items.append(MCItem(q.question_id, _check_video(rec, q.path, "videoID"), q.question,
                        q.options, q.answer, q.duration))
  return items


def read_longvideobench(annotations: str, video_root: str = "") -> list[MCItem]:
  """LongVideoBench records (lvb_val.json) -> MCItems (group from duration_group)."""
  annotations = os.fspath(annotations)
  video_root = os.fspath(video_root) or os.path.join(
      os.path.dirname(os.path.abspath(annotations)), "videos")
  items = []
  for index, record in enumerate(load_records(annotations)):
    rec = _Record(record, annotations, index)
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
      group = LVB_GROUPS.get(int(float(group_value)), f"{group_value}s")
    except ValueError:
      raise rec.error(f"field 'duration_group' should be a number of seconds, "
                      f"got {group_value!r}") from None
    path = rec.get("video_path")
    path = path if os.path.isabs(path) else os.path.join(video_root, path)
    options = tuple(f"{LETTERS[j]}. {c}" for j, c in enumerate(candidates))
    items.append(MCItem(str(record.get("id", index)), _check_video(rec, path, "video_path"),
                        rec.get("question"), options, LETTERS[correct], group))
  return items


def synthetic_eval_files(path: str) -> tuple[str, str]:
  """The synthetic dataset's folder (or its manifest.json) -> (annotations, video_root)."""
  path = os.fspath(path)
  manifest_path = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
  if not os.path.isfile(manifest_path):
    raise DataError(f"{manifest_path}: synthetic manifest not found (write the dataset with "
                    "python -m ma2mba_jax.data.synthetic --out DIR, then pass DIR)")
  with open(manifest_path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{manifest_path}: not valid JSON ({e})") from e
  entry = manifest.get("eval") if isinstance(manifest, dict) else None
  if not isinstance(entry, dict) or not entry.get("annotations"):
    raise DataError(f"{manifest_path}: missing field 'eval.annotations'")
  root = os.path.dirname(os.path.abspath(manifest_path))
  return (os.path.join(root, entry["annotations"]),
          os.path.join(root, entry.get("video_root") or ""))


def _find_video(video_root: str, name: str) -> str | None:
  for stem in (name, name if name.startswith("v_") else f"v_{name}"):
    for ext in VIDEO_EXTENSIONS:
      path = os.path.join(video_root, stem + ext)
      if os.path.isfile(path):
        return path
  return None


def read_activitynet_qa(questions: str, answers: str, video_root: str = "") -> list[OpenItem]:
  """ActivityNet-QA questions + answers files -> OpenItems (group = the answer's type)."""
  questions, answers = os.fspath(questions), os.fspath(answers)
  video_root = os.fspath(video_root) or os.path.dirname(os.path.abspath(questions))
  references: dict[str, tuple[str, str]] = {}
  for index, record in enumerate(load_records(answers)):
    rec = _Record(record, answers, index)
    rec.id = str(record.get("question_id", index))
    qid = str(rec.get("question_id", (str, int)))
    answer = rec.get("answer", (str, int, float))
    kind = record.get("type")
    group = ANETQA_TYPES.get(kind, str(kind)) if kind is not None else "all"
    references[qid] = (str(answer), group)
  items = []
  for index, record in enumerate(load_records(questions)):
    rec = _Record(record, questions, index)
    rec.id = str(record.get("question_id", index))
    qid = str(rec.get("question_id", (str, int)))
    if qid not in references:
      raise rec.error(f"question_id {qid!r} has no answer in {answers}")
    name = str(rec.get("video_name", (str, int)))
    path = _find_video(video_root, name)
    if path is None:
      raise rec.error(f"no video for video_name {name!r} under {video_root} (tried "
                      f"{name} and v_{name} with {', '.join(VIDEO_EXTENSIONS)})")
    answer, group = references[qid]
    items.append(OpenItem(qid, path, rec.get("question"), answer, group))
  return items


def read_items(benchmark: str, annotations: str, *, video_root: str = "", answers: str = ""
               ) -> list[MCItem] | list[OpenItem]:
  """The questions of a benchmark from local files (see the module docstring)."""
  if benchmark == "videomme":
    return read_videomme_items(annotations, video_root)
  if benchmark == "longvideobench":
    return read_longvideobench(annotations, video_root)
  if benchmark == "synthetic":
    file, root = synthetic_eval_files(annotations)
    return read_videomme_items(file, video_root or root)
  if benchmark == "activitynetqa":
    if not answers:
      guess = re.sub(r"_q\.json$", "_a.json", os.fspath(annotations))
      if guess == annotations:
        raise DataError(f"{annotations}: give the answers file (--answers) for ActivityNet-QA")
      answers = guess
    return read_activitynet_qa(annotations, answers, video_root)
  raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")


# --------------------------------------------------------------------------- answers


def parse_choice(text: str, item: MCItem) -> str | None:
  """The option a generated answer names: the first capital letter standing alone (not
  inside a word) that is one of the item's letters, e.g. "B", "(B) ...", "The answer is B.";
  failing that, the option whose text the answer equals (case and punctuation ignored).
  None when it names none."""
  letters = "".join(item.letters)
  match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
  if match:
    return match.group(1)
  said = normalize_answer(text)
  named = [letter for letter in item.letters if normalize_answer(item.option_text(letter))
           == said]
  return named[0] if len(named) == 1 and said else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
  text = str(text).lower()
  text = "".join(" " if ch in string.punctuation else ch for ch in text)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """F1 of the normalised words (a multiset): 2PR / (P + R); 1.0 when both are empty."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- tables

# Group order in tables: the paper's columns first, anything else after, sorted.
_GROUP_ORDER = ("short", "medium", "long", *LVB_GROUPS.values(), *ANETQA_TYPES.values())


def _ordered_groups(groups: Iterable[str]) -> list[str]:
  groups = set(groups)
  known = [g for g in _GROUP_ORDER if g in groups]
  return known + sorted(groups - set(known))


def chance_p_value(correct: int, chances: Sequence[float]) -> float:
  """The one-sided p-value of `correct` right answers against guessing: the exact
  probability that guessing gets at least `correct` right, question i right with
  probability chances[i] (1 / its number of options). The binomial tail (math.comb) when
  all chances are equal, else the Poisson-binomial tail by dynamic programming."""
  n = len(chances)
  if correct <= 0:
    return 1.0
  if correct > n:
    return 0.0
  if all(c == chances[0] for c in chances):
    p = chances[0]
    return min(1.0, sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k)
                        for k in range(correct, n + 1)))
  dist = [1.0]  # dist[k]: probability of k right among the questions so far
  for p in chances:
    dist = [(dist[k] if k < len(dist) else 0.0) * (1 - p)
            + (dist[k - 1] * p if k > 0 else 0.0) for k in range(len(dist) + 1)]
  return min(1.0, sum(dist[correct:]))


def accuracy_rows(records: Sequence[dict[str, Any]], methods: Sequence[str]
                  ) -> list[dict[str, Any]]:
  """Per method: one row per duration group and one 'overall' row with n, correct,
  accuracy (%), chance (%, the mean of 1 / #options over the questions) and p_value (the
  probability that guessing does at least as well, `chance_p_value`).

  records: {"group", "num_options", "<method>": {"correct": bool, ...}} per question.
  """
  rows = []
  for method in methods:
    scored = [r for r in records if method in r]
    groups = _ordered_groups(r["group"] for r in scored)
    for group in [*groups, "overall"]:
      subset = [r for r in scored if group == "overall" or r["group"] == group]
      if not subset:
        continue
      correct = sum(bool(r[method]["correct"]) for r in subset)
      chances = [1.0 / r["num_options"] for r in subset]
      rows.append({"method": method, "group": group, "n": len(subset), "correct": correct,
                   "accuracy": 100.0 * correct / len(subset),
                   "chance": 100.0 * sum(chances) / len(subset),
                   "p_value": chance_p_value(correct, chances)})
  return rows


def open_ended_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per group and 'overall': n, exact match (%) and mean token F1 (%).

  records: {"group", "exact_match": 0/1, "f1": float} per question."""
  rows = []
  for group in [*_ordered_groups(r["group"] for r in records), "overall"]:
    subset = [r for r in records if group == "overall" or r["group"] == group]
    if subset:
      rows.append({"group": group, "n": len(subset),
                   "exact_match": 100.0 * sum(r["exact_match"] for r in subset) / len(subset),
                   "f1": 100.0 * sum(r["f1"] for r in subset) / len(subset)})
  return rows
