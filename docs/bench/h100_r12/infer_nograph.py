"""Session 12 exploration (not a library entry point): does the 3.1B model decode slower
after a prefill because the prefill's executables use XLA command buffers (CUDA graphs)?
Times 256-token greedy answers (median of 3, fused_mixed, the defaults) from the LM's zero
states before any prefill (A), then builds the Streamer with every jax.jit patched to
compile without command buffers (compiler_options xla_gpu_enable_command_buffer=''),
reads a 16K-token video and times the same answers again (B) and from the video's states
(C). Session 12's call d / e had A 408, B 388-393, C 397 with command buffers everywhere.
  python docs/bench/h100_r12/infer_nograph.py"""
import statistics
import time

import jax

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.infer.stream import Streamer


def rate(sampler, states, logits, label):
  params = SamplingParams(max_new_tokens=256, stop_on_repeat=False)
  sampler.generate(states, logits, params)
  rates = []
  for _ in range(3):
    start = time.perf_counter()
    n = len(sampler.generate(states, logits, params).sampled)
    rates.append(n / (time.perf_counter() - start))
  print(f"{label}: {statistics.median(rates):.1f} tok/s "
        f"({', '.join(f'{r:.1f}' for r in rates)})", flush=True)


def main():
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model("3.1b", "bfloat16", "bfloat16", "auto", vocab_size(tokenizer))
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  rate(sampler, zero, logits, "A zero states, before any prefill")
  jit = jax.jit
  jax.jit = lambda f, **kw: jit(f, compiler_options={"xla_gpu_enable_command_buffer": ""}, **kw)
  streamer = Streamer(model, tokenizer, frames_per_step=64)
  jax.jit = jit
  start = time.perf_counter()
  conv = streamer.read_frames(bench_infer.frame_batches(114, 64, streamer.image_size), 114)
  conv = streamer.ask(conv, bench_infer.QUESTION)
  jax.block_until_ready(conv.logits)
  print(f"prefill without command buffers (with its compilation): "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  rate(sampler, zero, logits, "B zero states, after the prefill")
  rate(sampler, conv.states, conv.logits, "C the video's states")


if __name__ == "__main__":
  main()
