"""Comparison helpers shared by the tests and the numerical checks in bench/."""

from __future__ import annotations

import numpy as np


def rel_err(out, ref, *, nan_if_not_finite: bool = False) -> float:
  """‖out − ref‖ / ‖ref‖ in float64 (any dtype in, bf16 included).

  A NaN or inf in `out` fails an assertion, or gives NaN with `nan_if_not_finite` (a
  check that reports every backend rather than stopping at the first)."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    if nan_if_not_finite:
      return float("nan")
    raise AssertionError("rel_err: the output has NaN or inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
