"""Small helpers shared by the benchmark scripts: timing, memory, OOM rows, child processes.
Tables, JSON and the environment come from ma2mba_jax/reporting.py (evaluate.py uses them
too), re-exported here for the scripts."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import jax

from ma2mba_jax.reporting import environment, print_table, write_json

__all__ = ["block", "median_ms", "kernel_counts", "device_memory_stats", "is_oom", "time_steps",
           "oom_row", "run_child", "environment", "print_table", "write_json"]


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def median_ms(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time of fn() in ms, synchronising on its outputs every call."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def device_memory_stats() -> dict[str, int]:
  """The first local device's allocator stats ({} on backends without them, e.g. CPU)."""
  return jax.local_devices()[0].memory_stats() or {}


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def time_steps(step: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of each of `repeats` calls of step(), each waited for."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(step())
    times.append(time.perf_counter() - start)
  return times


def oom_row(err: BaseException, row: dict[str, Any]) -> dict[str, Any]:
  """`row` with error "OOM" when `err` is an out-of-memory error (a result, not a crash);
  any other error is raised again."""
  if not is_oom(err):
    raise err
  return {**row, "error": "OOM"}


def run_child(cmd: Sequence[str], *, timeout: int, identity: dict[str, Any]) -> dict[str, Any]:
  """Runs one measurement in a fresh process (the allocator's peak cannot be reset) and
  returns the JSON of its last `RESULT {...}` line; an OOM, a timeout or a crash becomes
  `identity` plus an "error" entry instead of an exception."""
  try:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**identity, "error": f"timeout {timeout}s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr or proc.stdout)[-2000:]
  return {**identity, "error": "OOM" if is_oom(Exception(tail)) else f"failed: {tail[-300:]}"}


# Ops of an optimized HLO module that launch no kernel of their own.
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id"}


def kernel_counts(hlo_text: str) -> dict[str, int]:
  """Ops that launch work per computation of an optimized HLO module (fusions, library
  calls, unfused copies ...), fused computations and reducers left out: what one run of
  each computation (e.g. a while body: one layer of a scan) launches."""
  called = set(re.findall(r"(?:calls|to_apply)=(%[\w.\-]+)", hlo_text))
  counts: dict[str, int] = {}
  name = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
    if head:
      name = None if head.group(1) in called else head.group(1)
      continue
    op = re.match(r"^\s+(?:ROOT )?%\S+ = .*? ([a-z][\w\-]*)\(", line)
    if name and op and op.group(1) not in _NO_KERNEL:
      counts[name] = counts.get(name, 0) + 1
  return counts
