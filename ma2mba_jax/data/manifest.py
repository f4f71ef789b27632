"""Reading a synthetic dataset's manifest.json (what `python -m ma2mba_jax.data.synthetic`
writes): the training sources of each stage and the eval set's files. The trainer and the
evaluation benchmarks read datasets through this module, never through the generator."""

from __future__ import annotations

import json
import os
from typing import Any

from ma2mba_jax.data.errors import DataError

FILE = "manifest.json"
_MAKE = "python -m ma2mba_jax.data.synthetic --out DIR"


def _load(manifest_path: str) -> Any:
  if not os.path.isfile(manifest_path):
    raise DataError(f"{manifest_path}: synthetic manifest not found (write the dataset with "
                    f"{_MAKE}, then pass DIR)")
  with open(manifest_path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{manifest_path}: not valid JSON ({e})") from e


def sources(out: str, stage: int | str) -> dict[str, list[dict]]:
  """The data config's `sources` for a stage of a dataset written to `out` (absolute
  paths), e.g. config.data.sources = sources(DIR, 2)."""
  with open(os.path.join(out, FILE), encoding="utf-8") as f:
    manifest = json.load(f)
  return {split: [{**s, "annotations": os.path.join(out, s["annotations"]),
                   "media_root": os.path.join(out, s["media_root"])} for s in entries]
          for split, entries in manifest["sources"][str(stage)].items()}


def eval_files(path: str) -> tuple[str, str]:
  """The dataset's folder (or its manifest.json) -> (eval annotations, eval video root)."""
  path = os.fspath(path)
  manifest_path = os.path.join(path, FILE) if os.path.isdir(path) else path
  manifest = _load(manifest_path)
  entry = manifest.get("eval") if isinstance(manifest, dict) else None
  if not isinstance(entry, dict) or not entry.get("annotations"):
    raise DataError(f"{manifest_path}: missing field 'eval.annotations'")
  root = os.path.dirname(os.path.abspath(manifest_path))
  return (os.path.join(root, entry["annotations"]),
          os.path.join(root, entry.get("video_root") or ""))
