"""Session 12 exploration (not a library entry point): is the 3.1B model's slower decoding
after a video's prefill a cost per answer or per token? Times greedy answers of 64, 256 and
1024 tokens (median of 3 seconds each; fused_mixed, the defaults) from the LM's zero states
before any prefill (A) and from a 16K-token video's states after its prefill (C), and fits
seconds = fixed + tokens x per-token to each series. Env K: tokens a loop iteration
(sample.TOKENS_PER_ITERATION; default 4). Then the parts of one answer after the prefill:
the first token (Sampler._start) and one loop dispatch of k tokens (Sampler._block).
  [K=16] python docs/bench/h100_r12/infer_fixed.py"""
import os
import statistics
import time

import jax
import numpy as np

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer import sample
from ma2mba_jax.infer.sample import Sampler, SamplingParams, knobs_of, mode_of
from ma2mba_jax.infer.stream import Streamer

LENGTHS = (64, 256, 1024) if os.environ.get("PRESET", "3.1b") == "3.1b" else (4, 8, 16)
FRAMES = 114 if os.environ.get("PRESET", "3.1b") == "3.1b" else 8
sample.TOKENS_PER_ITERATION = int(os.environ.get("K", sample.TOKENS_PER_ITERATION))


def parts(sampler, states, logits):
  """Median ms of Sampler._start (the first token; copies the states into the loop's) and
  of one _block dispatch of k tokens after it, each waited for."""
  params = SamplingParams(max_new_tokens=256, stop_on_repeat=False)
  mode, knobs = mode_of(params), knobs_of(params)
  key = jax.random.key(0)
  stop = jax.numpy.asarray([-1], jax.numpy.int32)
  k = sampler.tokens_per_iteration
  start_ms, block_ms = [], []
  for _ in range(6):
    begin = time.perf_counter()
    state = jax.block_until_ready(sampler._start(states, logits.reshape(1, -1), key, knobs,
                                                 sampler.allowed, stop, max_new=256,
                                                 mode=mode))
    start_ms.append((time.perf_counter() - begin) * 1e3)
    begin = time.perf_counter()
    jax.block_until_ready(sampler._block(sampler._leaves(), state, state.count + k,
                                         key, knobs, sampler.allowed, stop, mode=mode))
    block_ms.append((time.perf_counter() - begin) * 1e3)
  print(f"  parts (k={k}): first token {statistics.median(start_ms[1:]):.2f} ms, one loop "
        f"dispatch of {k} tokens {statistics.median(block_ms[1:]):.2f} ms", flush=True)


def series(sampler, states, logits, label):
  seconds = []
  for n in LENGTHS:
    params = SamplingParams(max_new_tokens=n, stop_on_repeat=False)
    sampler.generate(states, logits, params)                    # compiles / warms
    times = []
    for _ in range(3):
      start = time.perf_counter()
      assert len(sampler.generate(states, logits, params).sampled) == n
      times.append(time.perf_counter() - start)
    seconds.append(statistics.median(times))
  slope, fixed = np.polyfit(LENGTHS, seconds, 1)
  print(f"{label}: " + ", ".join(f"{n} tokens {s * 1e3:.1f} ms ({n / s:.1f} tok/s)"
                                 for n, s in zip(LENGTHS, seconds))
        + f"; fit: {fixed * 1e3:.2f} ms an answer + {slope * 1e3:.4f} ms a token "
          f"({1 / slope:.1f} tok/s)", flush=True)


def main():
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model(os.environ.get("PRESET", "3.1b"), "bfloat16", "bfloat16", "auto", vocab_size(tokenizer))
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  print(f"tokens a loop iteration: {sampler.tokens_per_iteration}", flush=True)
  series(sampler, zero, logits, "A zero states, before any prefill")
  parts(sampler, zero, logits)
  streamer = Streamer(model, tokenizer, frames_per_step=64)
  conv = streamer.read_frames(bench_infer.frame_batches(FRAMES, 64, streamer.image_size), FRAMES)
  conv = streamer.ask(conv, bench_infer.QUESTION)
  jax.block_until_ready(conv.logits)
  series(sampler, conv.states, conv.logits, "C a 16K-token video's states, after its prefill")
  parts(sampler, conv.states, conv.logits)
  series(sampler, zero, logits, "D zero states, after the prefill")


if __name__ == "__main__":
  main()
