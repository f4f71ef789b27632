"""Where a jitted call's device time goes: runs it under jax.profiler, reads the Perfetto
trace that the profiler writes (Chrome trace JSON) and sums the GPU kernels' durations by
name. Used by bench.infer (--profile_dir) to find the kernels that keep prefill and
decoding from the card's rates.

  rows = kernel_profile.profile(lambda: step(params, x), "/tmp/prof/frames", calls=3)
  kernel_profile.print_rows("frame step", rows)

A row is one kernel name: launches per call, total us per call, mean us per launch and its
share of the GPU busy time. On CPU (no GPU kernel events) the result is empty.

`idle(trace, calls)` reads the same rows as a timeline: where the GPU waits between
kernels (the gaps by size, and the kernel pairs around the longest waits), to tell time lost
between a loop's iterations from time lost inside them.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import defaultdict
from typing import Any, Callable

import jax

__all__ = ["profile", "profile_trace", "profile_steps", "kernel_rows", "idle", "print_rows",
           "print_idle"]


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
  count: dict[str, int] = defaultdict(int)
  total: dict[str, float] = defaultdict(float)
  for kernels in _stream_kernels(trace.get("traceEvents", [])).values():
    for event in kernels:
      count[event["name"]] += 1
      total[event["name"]] += float(event.get("dur", 0.0))
  busy = sum(total.values()) or 1.0
  rows = [{"kernel": name[:60], "launches/call": count[name] / calls,
           "us/call": total[name] / calls, "us/launch": total[name] / count[name],
           "share": total[name] / busy} for name in total]
  return sorted(rows, key=lambda r: -r["us/call"])


def _stream_kernels(events: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict]]:
  """The complete kernel events of each GPU stream row, in start order."""
  rows_of_kernels = _kernel_rows_of(events)
  streams: dict[tuple[int, int], list[dict]] = defaultdict(list)
  for event in events:
    key = (event.get("pid"), event.get("tid"))
    if event.get("ph") == "X" and key in rows_of_kernels:
      streams[key].append(event)
  for kernels in streams.values():
    kernels.sort(key=lambda e: float(e.get("ts", 0.0)))
  return streams


_GAP_BINS = ((0.0, 5.0), (5.0, 50.0), (50.0, float("inf")))   # us


def idle(trace: dict[str, Any], calls: int, top: int = 5) -> dict[str, Any]:
  """The busiest GPU stream as a timeline, per call (of `calls` profiled calls): span (first
  kernel's start to the last one's end), busy (kernel time), idle (span - busy), the idle
  time and count of the gaps between kernels by size (us), and the `top` (kernel before,
  kernel after) pairs by idle time. Time before the first kernel and after the last (host
  work around the calls) is not in the span. Empty without GPU rows."""
  streams = _stream_kernels(trace.get("traceEvents", []))
  if not streams:
    return {}
  kernels = max(streams.values(), key=len)
  end = lambda e: float(e.get("ts", 0.0)) + float(e.get("dur", 0.0))
  span = end(max(kernels, key=end)) - float(kernels[0].get("ts", 0.0))
  busy = sum(float(e.get("dur", 0.0)) for e in kernels)
  bins = {f"{lo:g}-{hi:g} us": [0.0, 0] for lo, hi in _GAP_BINS}
  pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
  reach = end(kernels[0])
  for before, after in zip(kernels, kernels[1:]):
    gap = float(after.get("ts", 0.0)) - max(reach, end(before))
    reach = max(reach, end(after))
    if gap <= 0.0:
      continue
    for (lo, hi), label in zip(_GAP_BINS, bins):
      if lo <= gap < hi:
        bins[label][0] += gap
        bins[label][1] += 1
    pair = pairs[(str(before["name"])[:40], str(after["name"])[:40])]
    pair[0] += gap
    pair[1] += 1
  ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
  return {"span us/call": span / calls, "busy us/call": busy / calls,
          "idle us/call": (span - busy) / calls,
          "gaps": {label: {"us/call": t / calls, "count/call": n / calls}
                   for label, (t, n) in bins.items()},
          "top pairs": [{"before": b, "after": a, "us/call": t / calls, "count/call": n / calls}
                        for (b, a), (t, n) in ranked]}


def profile_trace(fn: Callable[[], Any], log_dir: str, *, calls: int = 3) -> dict[str, Any]:
  """Runs fn() once (warm-up, compiles), then `calls` times under the profiler; returns the
  trace written to `log_dir` (empty if the profiler wrote none)."""
  jax.block_until_ready(fn())
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(fn())
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    return {}
  with gzip.open(paths[-1], "rt") as f:
    return json.load(f)


def profile(fn: Callable[[], Any], log_dir: str, *, calls: int = 3) -> list[dict[str, Any]]:
  """kernel_rows of profile_trace(fn, log_dir, calls=calls)."""
  return kernel_rows(profile_trace(fn, log_dir, calls=calls), calls)


def profile_steps(fn: Callable[[], Any], log_dir: str, steps: int, title: str, *,
                  top: int = 25, unit: str = "token"
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """One profiled call of fn (after a warm-up) that runs `steps` steps (e.g. a decode loop's
  tokens): its kernel rows with launches and us per step, and its timeline (idle) per call;
  prints both (print_rows, print_idle per step)."""
  trace = profile_trace(fn, log_dir, calls=1)
  rows = [dict(r, **{"us/call": r["us/call"] / steps,
                     "launches/call": r["launches/call"] / steps})
          for r in kernel_rows(trace, calls=1)]
  timeline = idle(trace, calls=1)
  print_rows(f"{title}, per {unit}", rows, top=top)
  print_idle(f"{title}, GPU timeline", timeline, per=steps, unit=unit)
  return rows, timeline


def print_rows(title: str, rows: list[dict[str, Any]], top: int = 25) -> None:
  """The `top` kernels by time, and the total GPU busy time per call."""
  busy = sum(r["us/call"] for r in rows)
  launches = sum(r["launches/call"] for r in rows)
  print(f"\n{title}: GPU busy {busy / 1e3:.3f} ms/call, {launches:.0f} kernel launches/call")
  for r in rows[:top]:
    print(f"  {r['us/call']:10.1f} us {r['share']:6.1%} {r['launches/call']:7.1f}x "
          f"{r['us/launch']:8.2f} us  {r['kernel']}")


def print_idle(title: str, summary: dict[str, Any], per: float = 1.0, unit: str = "call"
               ) -> None:
  """idle()'s summary, every time divided by `per` (e.g. tokens a call: per token)."""
  if not summary:
    return
  print(f"\n{title}: span {summary['span us/call'] / per:.1f} us/{unit}, busy "
        f"{summary['busy us/call'] / per:.1f}, idle {summary['idle us/call'] / per:.1f}")
  for label, gaps in summary["gaps"].items():
    print(f"  gaps {label:>12}: {gaps['us/call'] / per:9.2f} us in "
          f"{gaps['count/call'] / per:8.2f} gaps/{unit}")
  for pair in summary["top pairs"]:
    print(f"  {pair['us/call'] / per:9.2f} us in {pair['count/call'] / per:8.2f} gaps/{unit}:"
          f" {pair['before']} -> {pair['after']}")
