"""Session 14 (not a library entry point): where the decode loop's time goes with in_proj as
XLA's reduction and as gemv.in_proj_stream under a few launch settings. Call c: the kernel
alone took 22.1 us against XLA's 23.0 (bench.gemv), yet the loop took 2.61 ms a token
against 2.39. For each variant: a new Sampler (fused_mixed) traced under it, one profiled
256-token greedy answer from the 3.1B model's zero states (kernel_profile.profile_steps:
the kernels a token and the timeline's gaps), then the median of 3 answers' wall time.

Needs in_proj_stream.patch applied (gemv.IN_PROJ_REDUCE_IMPL, STREAM_*; not committed).

  python docs/bench/h100_r14/loop_profile.py
"""
import os
import statistics
import sys
import time

import jax

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.bench import kernel_profile
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.kernels.decode import gemv

PRESET = os.environ.get("PRESET", "3.1b")
TOKENS = 256 if PRESET == "3.1b" else 8
# (impl, block_n, block_k, warps, eviction)
VARIANTS = [("xla", 0, 0, 0, None), ("pallas", 8, 512, 4, "evict_first"),
            ("pallas", 8, 512, 4, None), ("pallas", 16, 512, 8, "evict_first"),
            ("pallas", 2, 512, 4, "evict_first"), ("xla", 0, 0, 0, None)]


def main():
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model(PRESET, "bfloat16", "bfloat16", "auto",
                                  vocab_size(tokenizer))
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  params = SamplingParams(max_new_tokens=TOKENS, stop_on_repeat=False)
  only = sys.argv[1:] and [int(i) for i in sys.argv[1:]]
  for index, (impl, bn, bk, warps, eviction) in enumerate(VARIANTS):
    if only and index not in only:
      continue
    gemv.IN_PROJ_REDUCE_IMPL = impl
    if impl == "pallas":
      gemv.STREAM_BLOCK_N, gemv.STREAM_BLOCK_K, gemv.STREAM_WARPS = bn, bk, warps
      gemv.STREAM_EVICTION = eviction
      gemv.in_proj_stream.clear_cache()
    label = f"{impl} bn={bn} bk={bk} warps={warps} {eviction}" if impl == "pallas" else impl
    sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
    answer = lambda: sampler.generate(zero, logits, params).sampled
    answer()
    rows, _ = kernel_profile.profile_steps(answer, f"/tmp/lprof/{index}", TOKENS, label,
                                           top=8)
    times = []
    for _ in range(3):
      start = time.perf_counter()
      answer()
      times.append(time.perf_counter() - start)
    print(f"== {label}: {TOKENS / statistics.median(times):.1f} tok/s "
          f"(GPU busy {sum(r['us/call'] for r in rows) / 1e3:.3f} ms a token)", flush=True)


if __name__ == "__main__":
  main()
