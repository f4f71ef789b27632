"""Training metrics: a JSONL file and TensorBoard event files in the workdir, and a console
progress line (step, loss, learning rate, tokens/s, step time, device memory, ETA)."""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import time
from typing import Any

import jax
from absl import logging


def device_memory_gib() -> float | None:
  """Peak bytes in use (GiB) on the fullest of this process's devices."""
  peaks = device_peaks_gib()
  return max(peaks) if peaks else None


def device_peaks_gib() -> list[float]:
  """Peak bytes in use (GiB) of each of this process's devices ([] where not reported)."""
  peaks = []
  for device in jax.local_devices():
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    if peak is None:
      return []
    peaks.append(peak / 2**30)
  return peaks


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, stage: int):
    self._enabled = jax.process_index() == 0
    self._stage = stage
    self._jsonl = None
    self._tb = None
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard is optional; the JSONL file is always written
        logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": step, "stage": self._stage, "time": time.time(), **scalars}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Rates and ETA over the steps since the last report, counted from `start` (call it once
  the first step, which includes the compile, is done)."""

  def __init__(self, first_step: int, total_steps: int):
    self._total = total_steps
    self._last_step = first_step
    self._last_time: float | None = None
    self._tokens = 0
    self._padded = 0  # tokens computed on, padding included (batch rows x T)

  def start(self, step: int) -> None:
    self._last_step, self._last_time, self._tokens = step, time.perf_counter(), 0
    self._padded = 0

  def add_tokens(self, n: int, padded: int | None = None) -> None:
    """n real (non-padding) tokens; `padded` the batch's tokens with padding (default n)."""
    self._tokens += n
    self._padded += n if padded is None else padded

  def report(self, step: int) -> dict[str, float]:
    """step_time_s, tokens_per_s, eta_s (none before two steps have run after `start`) and
    peak_memory_gib (the fullest local device; with several, peak_memory_gib/<i> each)."""
    out = {}
    now = time.perf_counter()
    if self._last_time is not None and step > self._last_step:
      elapsed = max(now - self._last_time, 1e-9)
      steps = step - self._last_step
      out = {"step_time_s": elapsed / steps, "tokens_per_s": self._tokens / elapsed,
             "padded_tokens_per_s": self._padded / elapsed,
             "padding_frac": 1.0 - self._tokens / max(self._padded, 1),
             "eta_s": (self._total - step) * elapsed / steps}
      self._last_step, self._last_time, self._tokens, self._padded = step, now, 0, 0
    peaks = device_peaks_gib()
    if peaks:
      out["peak_memory_gib"] = max(peaks)
      if len(peaks) > 1:
        out.update({f"peak_memory_gib/{i}": p for i, p in enumerate(peaks)})
    return out


def format_line(stage: int, step: int, total: int, scalars: dict[str, Any]) -> str:
  parts = [f"[stage {stage}] step {step}/{total}", f"loss {scalars['loss']:.4f}"]
  for key in sorted(k for k in scalars if k.startswith("lr/")):
    parts.append(f"{key} {scalars[key]:.2e}")
  if "eta_s" in scalars:
    eta = int(scalars["eta_s"])
    parts.append(f"{scalars['tokens_per_s']:,.0f} tok/s")
    if "padding_frac" in scalars:
      parts.append(f"{scalars['padded_tokens_per_s']:,.0f} padded tok/s "
                   f"({100 * scalars['padding_frac']:.0f}% padding)")
    parts.append(f"{scalars['step_time_s']:.2f} s/step")
  if "peak_memory_gib" in scalars:
    per_device = [scalars[k] for k in sorted(
        (k for k in scalars if k.startswith("peak_memory_gib/")),
        key=lambda k: int(k.split("/")[1]))]
    parts.append(f"mem {scalars['peak_memory_gib']:.1f} GiB" + (
        " (" + "/".join(f"{p:.1f}" for p in per_device) + " per device)" if per_device else ""))
  parts.append(f"ETA {eta // 60}m{eta % 60:02d}s" if "eta_s" in scalars
               else "ETA after the first step")
  return " | ".join(parts)


# Libraries whose INFO lines drown ours (183 of 189 in a 2-step run): WARNING and up only.
QUIET_LIBRARIES = ("orbax", "grain")


class _LibraryInfoFilter(logging_std.Filter):
  """Drops records below WARNING logged from inside the QUIET_LIBRARIES' packages."""

  def __init__(self, packages: tuple[str, ...]):
    super().__init__()
    self._markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        m in record.pathname for m in self._markers)


def quiet_library_logs(packages: tuple[str, ...] = QUIET_LIBRARIES) -> None:
  """Keeps our INFO lines and drops the INFO lines of orbax and grain. They log through absl
  (one Python logger, 'absl', for everyone), so the filter looks at the source file."""
  absl_logger = logging_std.getLogger("absl")
  if not any(isinstance(f, _LibraryInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryInfoFilter(packages))
  for name in packages:
    logging_std.getLogger(name).setLevel(logging_std.WARNING)
