"""Evaluation benchmarks (datasets and scoring; no model here: infer/answering.py answers).

A benchmark is one module of this package, found by its name (`evaluate --benchmark=NAME`
loads `ma2mba_jax/evals/NAME.py`); adding one is adding one file. The module defines:

  KIND               "multiple_choice" (accuracy, overall and by group, chance beside it)
                     or "open_ended" (exact match and token F1; no LLM judge).
  GROUPS             the group names in table order (duration groups, question types);
                     groups not listed come after, sorted.
  LIKELIHOOD_TARGET  multiple choice only: evaluate's default --likelihood_target,
                     "letter" or "text" (infer/answering.py says what each scores).
  read_items(annotations, *, video_root="", answers="") -> list[MCItem] | list[OpenItem]
                     the questions from local files, every video checked to exist; a bad
                     record raises DataError naming the file, the record index and id, and
                     the field (data.formats.Record does this).

Modules whose names start with "_" are shared code, not benchmarks. Built in: videomme,
longvideobench, activitynetqa, synthetic (each module's docstring gives its layout).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from types import ModuleType

from ma2mba_jax.evals._items import (LETTERS, VIDEO_EXTENSIONS, MCItem, OpenItem, check_video,
                                     find_video)
from ma2mba_jax.evals._scoring import (NO_JUDGE_NOTE, accuracy_rows, chance_p_value,
                                       exact_match, normalize_answer, open_ended_rows,
                                       parse_choice, token_f1)

__all__ = ["LETTERS", "VIDEO_EXTENSIONS", "MCItem", "OpenItem", "check_video", "find_video",
           "NO_JUDGE_NOTE", "accuracy_rows", "chance_p_value", "exact_match", "normalize_answer",
           "open_ended_rows", "parse_choice", "token_f1", "Benchmark", "names", "get",
           "read_items"]

KINDS = ("multiple_choice", "open_ended")
TARGETS = ("letter", "text")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark module's declarations (see the package docstring)."""
  name: str
  kind: str
  groups: tuple[str, ...]
  likelihood_target: str | None
  read_items: Callable[..., list[MCItem] | list[OpenItem]]

  @property
  def multiple_choice(self) -> bool:
    return self.kind == "multiple_choice"


def names() -> tuple[str, ...]:
  """The benchmarks: every module of this package not starting with "_", sorted."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if not m.name.startswith("_")))


def get(name: str) -> Benchmark:
  """The benchmark module `name`, its declarations checked."""
  if name.startswith("_") or name not in names():
    raise ValueError(f"unknown benchmark {name!r}; expected one of {names()} (a benchmark "
                     f"is a module ma2mba_jax/evals/<name>.py)")
  module = importlib.import_module(f"{__name__}.{name}")
  return _declarations(name, module)


def _declarations(name: str, module: ModuleType) -> Benchmark:
  where = getattr(module, "__file__", None) or name
  def need(attr, check, expected):
    value = getattr(module, attr, None)
    if not check(value):
      raise TypeError(f"{os.path.basename(where)}: benchmark {name!r} must define {attr} "
                      f"({expected}), got {value!r}")
    return value
  kind = need("KIND", lambda v: v in KINDS, f"one of {KINDS}")
  groups = need("GROUPS", lambda v: isinstance(v, Sequence) and not isinstance(v, str),
                "a tuple of group names")
  target = None
  if kind == "multiple_choice":
    target = need("LIKELIHOOD_TARGET", lambda v: v in TARGETS, f"one of {TARGETS}")
  read = need("read_items", callable, "a function")
  return Benchmark(name, kind, tuple(groups), target, read)


def read_items(name: str, annotations: str, *, video_root: str = "", answers: str = ""
               ) -> list[MCItem] | list[OpenItem]:
  """The questions of benchmark `name` from local files (see its module's docstring)."""
  return get(name).read_items(annotations, video_root=video_root, answers=answers)
