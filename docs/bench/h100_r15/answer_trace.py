"""Session 15 exploration (not a library entry point): where an answer's time goes beside
its tokens' GPU time. The 3.1B model's greedy answers (fused_mixed, zero states), after
an optional LM computation (STAGE=lm: the LM layers on 9,216 tokens, 4 times, the
slowdown's trigger), profiled with jax.profiler: 4-token answers (3 of them) and one
256-token answer. Each trace is copied to $OUT (trace_<tag>.json.gz) and summarised here:
the host events by name (count, total and mean us) and the GPU stream's timeline (the span
from the first kernel to the last, idle time, the gaps before the first kernel and after
the last relative to the answer's host span).

  STAGE=lm python docs/bench/h100_r15/answer_trace.py
"""
import os
import shutil
import sys
import time
from collections import defaultdict

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "h100_r13"))
import after_prefill as ap  # noqa: E402

from ma2mba_jax.bench import kernel_profile  # noqa: E402
from ma2mba_jax.data.tokenizer import vocab_size  # noqa: E402
from ma2mba_jax.infer.sample import Sampler, SamplingParams  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
os.makedirs(OUT, exist_ok=True)


def summarise(trace: dict, tag: str, calls: int, top: int = 40) -> None:
  events = trace.get("traceEvents", [])
  gpu_rows = kernel_profile._kernel_rows_of(events)
  names = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = str(e.get("args", {}).get("name", ""))
  host = defaultdict(lambda: [0, 0.0])
  host_span = [float("inf"), 0.0]
  kernels = []
  for e in events:
    if e.get("ph") != "X":
      continue
    key = (e.get("pid"), e.get("tid"))
    ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
    if key in gpu_rows:
      kernels.append((ts, dur))
    elif "GPU" not in names.get(e.get("pid"), "").upper():
      row = host[str(e.get("name"))[:90]]
      row[0] += 1
      row[1] += dur
      if "generate" in str(e.get("name")) or "PjitFunction" in str(e.get("name")):
        host_span[0] = min(host_span[0], ts)
        host_span[1] = max(host_span[1], ts + dur)
  print(f"\n=== {tag}: {calls} answer(s); host events by total time (count, total us a "
        f"call, mean us)")
  for name, (n, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"  {n / calls:8.1f} {t / calls:10.1f} {t / n:9.1f}  {name}")
  if kernels:
    kernels.sort()
    first, last = kernels[0][0], max(ts + d for ts, d in kernels)
    busy = sum(d for _, d in kernels)
    print(f"  GPU: {len(kernels) / calls:.0f} kernels a call, span {(last - first) / calls:.1f} "
          f"us a call, busy {busy / calls:.1f}, idle {(last - first - busy) / calls:.1f}")
    print(f"  host pjit span {host_span[0]:.0f}..{host_span[1]:.0f}; first kernel "
          f"{first - host_span[0]:.1f} us after its start; last kernel ends "
          f"{host_span[1] - last:.1f} us before its end")
    # the largest gaps on the GPU timeline, in order
    gaps = []
    reach = kernels[0][0] + kernels[0][1]
    for ts, d in kernels[1:]:
      if ts - reach > 20.0:
        gaps.append((ts - first, ts - reach))
      reach = max(reach, ts + d)
    print(f"  gaps > 20 us: {len(gaps)}, {sum(g for _, g in gaps):.1f} us in all; first ten "
          "(at us, gap us): " + ", ".join(f"({a:.0f}, {g:.0f})" for a, g in gaps[:10]))


def main():
  tokenizer, model, zero, logits = ap.decode_setup()
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  long_n = ap.LENGTHS[0]
  results = []
  ap.rates(sampler, zero, logits, "before", results)
  if os.environ.get("STAGE") == "lm":
    layers, llm_params = ap.layers_of(model.llm)
    ids = jax.random.randint(jax.random.key(3), (1, ap.LM_TOKENS), 0, 250)
    keep = ap.run_four(jax.jit(layers), llm_params, ids, zero)
    ap.rates(sampler, zero, logits, "after lm", results)
  for tag, n, calls in (("four", 4, 3), ("long", long_n, 1)):
    params = SamplingParams(max_new_tokens=n, stop_on_repeat=False)
    log_dir = f"/tmp/trace_{tag}"
    start = time.perf_counter()
    trace = kernel_profile.profile_trace(
        lambda: sampler.generate(zero, logits, params).sampled, log_dir, calls=calls)
    print(f"{tag}: profiled in {time.perf_counter() - start:.1f} s", flush=True)
    summarise(trace, tag, calls)
    for root, _, files in os.walk(log_dir):
      for f in files:
        if f == "perfetto_trace.json.gz":
          shutil.copy(os.path.join(root, f), os.path.join(OUT, f"trace_{tag}.json.gz"))


if __name__ == "__main__":
  main()
