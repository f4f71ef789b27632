"""Session 12 exploration (not a library entry point): where the 3.1B model's decoding in
bench.infer's process loses ~0.08 ms a token against bench.decode's with the same kernels.
Times 256-token greedy answers (median of 3; fused_mixed with the defaults: the mixer
prefetching 640 rows, 2 a program, 4 tokens a loop iteration) at points of bench.infer's setup, with the process's
CPU time per answer, its threads and CPU affinity:
  A: the 3.1B model built, one Sampler, the LM's zero states (bench.decode's inputs);
  B: after a Streamer read a 16K-token video and a question (the same zero states);
  C: from that video's states (what bench.infer times);
  D: A's inputs again, after C and 20 s idle.
After each point, nvidia-smi's SM / memory clocks, temperature and power (GPU clocks or
the host?). XLA_FLAGS of the process: as given (call e runs it under several).
  python docs/bench/h100_r12/infer_gap.py"""
import os
import statistics
import subprocess
import threading
import time

import jax
import numpy as np

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.kernels.decode import pallas

START = time.perf_counter()
PRESET, TOKENS = os.environ.get("PRESET", "3.1b"), int(os.environ.get("TOKENS", "256"))


def rate(sampler, states, logits, label):
  params = SamplingParams(max_new_tokens=TOKENS, stop_on_repeat=False)
  sampler.generate(states, logits, params)                      # compiles / warms
  rates, cpu = [], []
  for _ in range(3):
    wall, proc = time.perf_counter(), time.process_time()
    n = len(sampler.generate(states, logits, params).sampled)
    rates.append(n / (time.perf_counter() - wall))
    cpu.append((time.process_time() - proc) / (time.perf_counter() - wall))
  smi = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,"
                        "power.draw", "--format=csv,noheader"], capture_output=True,
                       text=True).stdout.strip() if PRESET == "3.1b" else "-"
  print(f"[{time.perf_counter() - START:.0f} s, gpu {smi}] "
        f"{label}: {statistics.median(rates):.1f} tok/s ({', '.join(f'{r:.1f}' for r in rates)});"
        f" process CPU / wall {statistics.median(cpu):.2f}; threads {threading.active_count()}"
        f" (os: {len(os.listdir('/proc/self/task'))}); affinity "
        f"{len(os.sched_getaffinity(0))} CPUs", flush=True)


def main():
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model(PRESET, "bfloat16", "bfloat16", "auto", vocab_size(tokenizer))
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  rate(sampler, zero, logits, "A zero states, model built")
  streamer = Streamer(model, tokenizer, frames_per_step=64)
  frames = 114 if PRESET == "3.1b" else 8
  conv = streamer.read_frames(bench_infer.frame_batches(frames, 64, streamer.image_size),
                              frames)
  conv = streamer.ask(conv, bench_infer.QUESTION)
  jax.block_until_ready(conv.logits)
  rate(sampler, zero, logits, "B zero states, after a 16K-token video")
  rate(sampler, conv.states, conv.logits, "C the video's states")
  time.sleep(20)
  rate(sampler, zero, logits, "D zero states again, after 20 s idle")
  host = np.asarray(jax.device_get(conv.states.ssm))
  print("video states: ssm |max|", float(np.abs(host).max()), "tiny (<1e-30, nonzero):",
        int(((np.abs(host) < 1e-30) & (host != 0)).sum()), flush=True)


if __name__ == "__main__":
  main()
