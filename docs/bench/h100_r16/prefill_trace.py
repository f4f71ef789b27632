"""Session 16 exploration (not a library entry point): where a 131K-token video's prefill
loses time beside its steps' GPU work. bench.infer's step parts (encoder 58 ms + LM layers
131 ms a 64-frame step) predict ~2.72 s for 911 frames; the end-to-end prefill measures
2.88-2.94 s. The 3.1B model (random bf16 weights, SSD backend $SSD, default auto), M = 64:
compiles every step shape, times read_frames on 911 frames 3 times, then profiles one and
prints the GPU timeline (span from the first kernel to the last, busy, idle gaps by size,
the kernel pairs around the longest gaps), wall time before the first kernel and after the
last, and the top kernels of the whole prefill.

  SSD=pallas python docs/bench/h100_r16/prefill_trace.py
"""
import os
import time

import jax

from ma2mba_jax.bench import kernel_profile
from ma2mba_jax.bench.infer import QUESTION, build_model, frame_batches
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.video_lm import fast_vision_attention

PRESET = os.environ.get("PRESET", "3.1b")
SSD = os.environ.get("SSD", "auto")
M = int(os.environ.get("M", "64"))
FRAMES = int(os.environ.get("FRAMES", "911"))
OUT = os.environ.get("OUT", "/tmp")

tokenizer = train_tokenizer([SYSTEM_PROMPT, QUESTION], vocab_size=300)
model = build_model(PRESET, "bfloat16", "bfloat16", SSD, vocab_size(tokenizer))
streamer = Streamer(model, tokenizer, frames_per_step=M,
                    vision_attention=fast_vision_attention(model.config))


def prefill(frames: int):
  conv = streamer.read_frames(frame_batches(frames, M, streamer.image_size), frames)
  return jax.block_until_ready(conv.states)


start = time.perf_counter()
prefill(2 * M - 1)            # every step shape: M, then M/2, ..., 1
print(f"warm-up {time.perf_counter() - start:.1f} s", flush=True)
k = streamer.tokens_per_frame
for _ in range(3):
  start = time.perf_counter()
  prefill(FRAMES)
  s = time.perf_counter() - start
  print(f"prefill {FRAMES} frames: {s:.3f} s, {FRAMES * k / s:,.0f} tok/s", flush=True)

start = time.perf_counter()
trace = kernel_profile.profile_trace(lambda: prefill(FRAMES), os.path.join(OUT, "prof"),
                                     calls=1)
print(f"profiled run (with its unprofiled warm-up): {time.perf_counter() - start:.3f} s")
timeline = kernel_profile.idle(trace, calls=1, top=12)
kernel_profile.print_idle("prefill, GPU timeline", timeline)
kernel_profile.print_rows("prefill kernels", kernel_profile.kernel_rows(trace, calls=1), top=30)
# Host side: the profiled call's host span against the GPU span.
events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
gpu = kernel_profile._kernel_rows_of(events)
kernels = sorted((float(e["ts"]), float(e.get("dur", 0))) for e in events
                 if (e.get("pid"), e.get("tid")) in gpu)
host = [e for e in events if (e.get("pid"), e.get("tid")) not in gpu]
if kernels and host:
  first, last = kernels[0][0], max(t + d for t, d in kernels)
  h0 = min(float(e["ts"]) for e in host)
  h1 = max(float(e["ts"]) + float(e.get("dur", 0)) for e in host)
  print(f"\nhost events {h0:.0f}..{h1:.0f} us; first kernel at +{first - h0:.0f} us, last "
        f"kernel ends at +{last - h0:.0f} us; host span {h1 - h0:.0f} us")
  # The 20 longest host events (what the host does while the GPU waits).
  for e in sorted(host, key=lambda e: -float(e.get("dur", 0)))[:20]:
    print(f"  {float(e.get('dur', 0)):10.0f} us at +{float(e['ts']) - h0:9.0f}  "
          f"{str(e.get('name'))[:100]}")
