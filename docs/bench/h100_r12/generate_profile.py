"""Session 12 exploration (not a library entry point): cProfile of Sampler.generate's host
side for 4-token answers (2.7B LM, fused_mixed, zero states), to find the ~6 ms an answer
costs beyond Sampler._start and one loop dispatch (dispatch.py, call i).
  python docs/bench/h100_r12/generate_profile.py"""
import cProfile
import os
import pstats
import time

import jax
from absl import app

from ma2mba_jax.bench.decode import build
from ma2mba_jax.infer.sample import Sampler, SamplingParams


def main(argv):
  del argv
  llm = build(os.environ.get("PRESET", "2.7b"))
  sampler = Sampler(llm, vocab_size=llm.config.vocab_size, step_impl="fused_mixed")
  states = llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (llm.config.padded_vocab_size,))
  params = SamplingParams(max_new_tokens=4, stop_on_repeat=False)
  for _ in range(3):
    sampler.generate(states, logits, params)
  start = time.perf_counter()
  for _ in range(20):
    sampler.generate(states, logits, params)
  print(f"generate(4 tokens): {(time.perf_counter() - start) / 20 * 1e3:.2f} ms", flush=True)
  profile = cProfile.Profile()
  profile.enable()
  for _ in range(20):
    sampler.generate(states, logits, params)
  profile.disable()
  pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
  app.run(main)
