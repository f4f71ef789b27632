"""Answer parsing and scoring shared by the benchmarks: the option a generated answer names,
exact match and token F1, the exact chance p-value, and the results tables."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

from ma2mba_jax.evals._items import MCItem

NO_JUDGE_NOTE = ("open-ended answers scored by exact match and token F1 only: there is no LLM "
                 "judge here, so these numbers are not comparable with the paper's GPT-judged "
                 "accuracy / score")


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


def _ordered_groups(groups: Iterable[str], order: Sequence[str]) -> list[str]:
  """The groups in `order` first (a benchmark's table order), anything else after, sorted."""
  groups = set(groups)
  known = [g for g in order if g in groups]
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


def accuracy_rows(records: Sequence[dict[str, Any]], methods: Sequence[str],
                  group_order: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Per method: one row per duration group (in `group_order`, others after) and one
  'overall' row with n, correct, accuracy (%), chance (%, the mean of 1 / #options over the
  questions) and p_value (the probability that guessing does at least as well,
  `chance_p_value`).

  records: {"group", "num_options", "<method>": {"correct": bool, ...}} per question.
  """
  rows = []
  for method in methods:
    scored = [r for r in records if method in r]
    groups = _ordered_groups((r["group"] for r in scored), group_order)
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


def open_ended_rows(records: Sequence[dict[str, Any]], group_order: Sequence[str] = ()
                    ) -> list[dict[str, Any]]:
  """One row per group (in `group_order`, others after) and 'overall': n, exact match (%)
  and mean token F1 (%).

  records: {"group", "exact_match": 0/1, "f1": float} per question."""
  rows = []
  for group in [*_ordered_groups((r["group"] for r in records), group_order), "overall"]:
    subset = [r for r in records if group == "overall" or r["group"] == group]
    if subset:
      rows.append({"group": group, "n": len(subset),
                   "exact_match": 100.0 * sum(r["exact_match"] for r in subset) / len(subset),
                   "f1": 100.0 * sum(r["f1"] for r in subset) / len(subset)})
  return rows
