"""Session 14 (not a library entry point): the 3.1B model's greedy decode with in_proj as
XLA's reduction (session 13's default) and as a kernel (gemv.in_proj_stream: raw Triton
through jax-triton in call b, Pallas from call c on; the new GPU default), side by side in
one process, from the LM's zero states before and after a 114-frame video's prefill (the
Streamer). after_prefill.rates per point: median of 3 answers of 256 and 1024 tokens, the
marginal ms a token, a 4-token answer.

Needs in_proj_stream.patch applied (gemv.IN_PROJ_REDUCE_IMPL; not committed: slower).

  python docs/bench/h100_r14/ab_decode.py      # PRESET=tiny for a CPU smoke run (xla only)
"""
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "h100_r13"))
import after_prefill as ap  # noqa: E402

from ma2mba_jax.bench import infer as bench_infer  # noqa: E402
from ma2mba_jax.data.template import SYSTEM_PROMPT  # noqa: E402
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size  # noqa: E402
from ma2mba_jax.infer.sample import Sampler  # noqa: E402
from ma2mba_jax.infer.stream import Streamer  # noqa: E402
from ma2mba_jax.kernels.decode import gemv  # noqa: E402


def main():
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model(ap.PRESET, "bfloat16", "bfloat16", "auto",
                                  vocab_size(tokenizer))
  impls = ("xla", "pallas") if jax.default_backend() == "gpu" else ("xla",)
  samplers = {}
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  results = []
  for impl in impls:   # each sampler traces its loops at its first answer, under its impl
    gemv.IN_PROJ_REDUCE_IMPL = impl
    samplers[impl] = Sampler(model.llm, vocab_size=vocab_size(tokenizer),
                             step_impl="fused_mixed")
    ap.rates(samplers[impl], zero, logits, f"before the video, in_proj {impl}", results)
  gemv.IN_PROJ_REDUCE_IMPL = "auto"
  streamer = Streamer(model, tokenizer, frames_per_step=64)
  batches = bench_infer.frame_batches(ap.FRAMES, 64, streamer.image_size)
  conv = streamer.ask(streamer.read_frames(batches, ap.FRAMES), bench_infer.QUESTION)
  jax.block_until_ready(conv.logits)
  for repeat in range(2):
    for impl in impls:
      ap.rates(samplers[impl], zero, logits, f"after the video ({repeat}), in_proj {impl}",
               results)
  for impl in impls:
    ap.rates(samplers[impl], conv.states, conv.logits, f"the video's states, in_proj {impl}",
             results)


if __name__ == "__main__":
  main()
