"""Where a jitted call's device time goes: runs it under jax.profiler, reads the Perfetto
trace that the profiler writes (Chrome trace JSON) and sums the GPU kernels' durations by
name. Used by bench.infer (--profile_dir) to find the kernels that keep prefill and
decoding from the card's rates.

  rows = kernel_profile.profile(lambda: step(params, x), "/tmp/prof/frames", calls=3)
  kernel_profile.print_rows("frame step", rows)

A row is one kernel name: launches per call, total us per call, mean us per launch and its
share of the GPU busy time. On CPU (no GPU kernel events) the result is empty.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import defaultdict
from typing import Any, Callable

import jax

__all__ = ["profile", "kernel_rows", "print_rows"]


def _kernel_rows_of(events: list[dict[str, Any]]) -> set[tuple[int, int]]:
  """(pid, tid) of the trace's GPU stream rows: the profiler names the process
  /device:GPU:N and its kernel rows "Stream #..."; its other rows ("XLA Ops", "XLA
  Modules") span the same time again and are left out."""
  pids, threads = set(), {}
  for event in events:
    if event.get("ph") != "M":
      continue
    name = str(event.get("args", {}).get("name", ""))
    if event.get("name") == "process_name" and "GPU" in name.upper() and "HOST" not in name.upper():
      pids.add(event["pid"])
    elif event.get("name") == "thread_name":
      threads[(event["pid"], event.get("tid"))] = name
  return {key for key, name in threads.items() if key[0] in pids and "stream" in name.lower()}


def kernel_rows(trace: dict[str, Any], calls: int) -> list[dict[str, Any]]:
  """Per kernel name: launches and microseconds per call (of `calls` profiled calls), sorted
  by time. Only the GPU stream rows' complete events ("ph": "X") count."""
  events = trace.get("traceEvents", [])
  rows_of_kernels = _kernel_rows_of(events)
  count: dict[str, int] = defaultdict(int)
  total: dict[str, float] = defaultdict(float)
  for event in events:
    if event.get("ph") == "X" and (event.get("pid"), event.get("tid")) in rows_of_kernels:
      count[event["name"]] += 1
      total[event["name"]] += float(event.get("dur", 0.0))
  busy = sum(total.values()) or 1.0
  rows = [{"kernel": name[:60], "launches/call": count[name] / calls,
           "us/call": total[name] / calls, "us/launch": total[name] / count[name],
           "share": total[name] / busy} for name in total]
  return sorted(rows, key=lambda r: -r["us/call"])


def profile(fn: Callable[[], Any], log_dir: str, *, calls: int = 3) -> list[dict[str, Any]]:
  """Runs fn() once (warm-up, compiles), then `calls` times under the profiler; returns
  kernel_rows of the trace written to `log_dir`."""
  jax.block_until_ready(fn())
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(fn())
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    return []
  with gzip.open(paths[-1], "rt") as f:
    return kernel_rows(json.load(f), calls)


def print_rows(title: str, rows: list[dict[str, Any]], top: int = 25) -> None:
  """The `top` kernels by time, and the total GPU busy time per call."""
  busy = sum(r["us/call"] for r in rows)
  launches = sum(r["launches/call"] for r in rows)
  print(f"\n{title}: GPU busy {busy / 1e3:.3f} ms/call, {launches:.0f} kernel launches/call")
  for r in rows[:top]:
    print(f"  {r['us/call']:10.1f} us {r['share']:6.1%} {r['launches/call']:7.1f}x "
          f"{r['us/launch']:8.2f} us  {r['kernel']}")
