"""Session 12 exploration (not a library entry point): what one answer of the device loop
costs besides its tokens (2.7B LM, fused_mixed, zero states, batch 1), median ms of 7:
  generate(4 tokens) / generate(8 tokens)  a whole answer (k = 4: one and two iterations);
  _start                                   the first token (copies the states);
  _block, 0 iterations                     a loop dispatch whose condition is false at once;
  _block, 4 tokens                         a loop dispatch of one iteration;
  jit(weights, x) -> x + 1                 a dispatch that takes the ~580 weight arrays (as
                                           the nnx tree; from call k on also as a list);
  jit(x) -> x + 1                          a dispatch of one small array.
(From call k on, _block takes the weights as Sampler._leaves().)
  python docs/bench/h100_r12/dispatch.py"""
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app

from ma2mba_jax.bench.decode import build
from ma2mba_jax.infer.sample import Sampler, SamplingParams, knobs_of, mode_of


def ms(fn, n=7):
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times[1:])


def main(argv):
  del argv
  llm = build(os.environ.get("PRESET", "2.7b"))
  sampler = Sampler(llm, vocab_size=llm.config.vocab_size, step_impl="fused_mixed")
  states = llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (1, llm.config.padded_vocab_size))
  weights = sampler.device_weights()
  print("weight arrays:", len(jax.tree.leaves(weights)), flush=True)
  params = SamplingParams(max_new_tokens=256, stop_on_repeat=False)
  mode, knobs = mode_of(params), knobs_of(params)
  key, stop = jax.random.key(0), jnp.asarray([-1], jnp.int32)
  k = sampler.tokens_per_iteration
  start = lambda: sampler._start(states, logits, key, knobs, sampler.allowed, stop,
                                 max_new=256, mode=mode)

  def block(tokens):
    state = jax.block_until_ready(start())
    begin = time.perf_counter()
    jax.block_until_ready(sampler._block(sampler._leaves(), state, state.count + tokens, key, knobs,
                                         sampler.allowed, stop, mode=mode))
    return (time.perf_counter() - begin) * 1e3

  for n in (4, 8):
    p = SamplingParams(max_new_tokens=n, stop_on_repeat=False)
    sampler.generate(states, logits[0], p)
    print(f"generate({n} tokens): {ms(lambda: sampler.generate(states, logits[0], p).sampled):.2f} ms",
          flush=True)
  print(f"_start: {ms(start):.2f} ms", flush=True)
  for tokens in (0, k):
    block(tokens)
    print(f"_block, {tokens} tokens: {statistics.median([block(tokens) for _ in range(7)]):.2f} ms",
          flush=True)
  x = jnp.zeros((4,))
  with_weights = jax.jit(lambda w, x: x + 1)
  alone = jax.jit(lambda x: x + 1)
  leaves = sampler._leaves()
  print(f"jit(weights, x): {ms(lambda: with_weights(weights, x)):.3f} ms; jit(leaves, x): "
        f"{ms(lambda: with_weights(leaves, x)):.3f} ms; jit(x): {ms(lambda: alone(x)):.3f} ms",
        flush=True)


if __name__ == "__main__":
  app.run(main)
