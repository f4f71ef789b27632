"""What the scripts print and write: a results table, a JSON file, and the environment a
result was measured in. Shared by evaluate.py and the benchmark scripts (bench/); it knows
nothing of models or training."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  """`rows` as a right-aligned text table of `columns` (floats to 3 decimals, or 1 from 100)."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return "-" if v is None else str(v)
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print(" | ".join(c.rjust(w) for c, w in zip(columns, widths)))
  print("-+-".join("-" * w for w in widths))
  for row in cells:
    print(" | ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  """Writes `payload` (indented) to `path`, making its folder; nothing when path is empty."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


def environment() -> dict[str, Any]:
  """The jax version, platform, device kind and date a result was measured with."""
  dev = jax.devices()[0]
  return {"jax": jax.__version__, "platform": dev.platform,
          "device": getattr(dev, "device_kind", str(dev)), "date": time.strftime("%Y-%m-%d")}
