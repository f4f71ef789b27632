"""bench/kernel_profile.py: kernel times read from a profiler trace (Chrome trace JSON)."""

import pytest

from ma2mba_jax.bench import kernel_profile


def _trace():
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,
                                       "args": {"name": name}}
  kernel = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name,
                                        "ts": 0, "dur": dur}
  return {"traceEvents": [
      meta(1, 0, "process_name", "/host:CPU"),
      meta(2, 0, "process_name", "/device:GPU:0"),
      meta(2, 7, "thread_name", "Stream #13(Compute)"),
      meta(2, 8, "thread_name", "XLA Ops"),
      kernel(2, 7, "gemv", 30.0), kernel(2, 7, "gemv", 34.0), kernel(2, 7, "mixer", 6.0),
      kernel(2, 8, "fusion.1", 70.0),             # the op row repeats the kernels' time
      kernel(1, 0, "PjitFunction", 500.0),        # host rows never count
  ]}


def test_kernel_rows_sum_stream_kernels_per_call():
  rows = kernel_profile.kernel_rows(_trace(), calls=2)
  assert [r["kernel"] for r in rows] == ["gemv", "mixer"]
  gemv, mixer = rows
  assert gemv["launches/call"] == 1.0 and gemv["us/call"] == 32.0
  assert gemv["us/launch"] == 32.0 and mixer["us/call"] == 3.0
  assert gemv["share"] == pytest.approx(64 / 70)


def test_kernel_rows_without_gpu_rows_is_empty():
  trace = _trace()
  trace["traceEvents"] = [e for e in trace["traceEvents"] if e["pid"] == 1]
  assert kernel_profile.kernel_rows(trace, calls=1) == []


def test_idle_reads_the_gaps_between_kernels():
  meta = {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
          "args": {"name": "Stream #13(Compute)"}}
  process = {"ph": "M", "pid": 2, "tid": 0, "name": "process_name",
             "args": {"name": "/device:GPU:0"}}
  kernel = lambda name, ts, dur: {"ph": "X", "pid": 2, "tid": 7, "name": name, "ts": ts,
                                  "dur": dur}
  # a 2 us gap (mixer after gemv), a 100 us one (gemv after cond), none after the mixer
  events = [process, meta, kernel("cond", 200.0, 10.0), kernel("gemv", 0.0, 30.0),
            kernel("mixer", 32.0, 6.0), kernel("out", 38.0, 12.0), kernel("gemv", 310.0, 30.0)]
  summary = kernel_profile.idle({"traceEvents": events}, calls=2)
  assert summary["span us/call"] == 170.0 and summary["busy us/call"] == 44.0
  assert summary["idle us/call"] == 126.0
  assert summary["gaps"]["0-5 us"] == {"us/call": 1.0, "count/call": 0.5}
  assert summary["gaps"]["5-50 us"] == {"us/call": 0.0, "count/call": 0.0}
  assert summary["gaps"]["50-inf us"] == {"us/call": 125.0, "count/call": 1.0}
  first = summary["top pairs"][0]
  assert (first["before"], first["after"], first["us/call"]) == ("out", "cond", 75.0)
  assert kernel_profile.idle({"traceEvents": [process]}, calls=1) == {}


def test_profile_steps_gives_rows_per_step_and_the_timeline(monkeypatch, capsys):
  monkeypatch.setattr(kernel_profile, "profile_trace", lambda fn, log_dir, calls: _trace())
  rows, timeline = kernel_profile.profile_steps(lambda: None, "unused", steps=4, title="loop")
  gemv, mixer = rows
  assert gemv["launches/call"] == 0.5 and gemv["us/call"] == 16.0 and mixer["us/call"] == 1.5
  assert gemv["us/launch"] == 32.0                     # per launch, not divided
  assert timeline["busy us/call"] == 70.0
  printed = capsys.readouterr().out
  assert "loop, per token" in printed and "loop, GPU timeline" in printed
