"""Session 13 exploration (not a library entry point): what makes the 3.1B model decode
~3% slower per token after a video's prefill (session 12, infer_fixed.py)? Times greedy
answers (fused_mixed, the defaults) from the LM's zero states, median of 3, after each of
these stages, in order (env ORDER, comma-separated):
  enc   the vision encoder alone on 64 frames, 4 times (the Streamer's attention)
  lm    the LM layers alone (apply_layers, scan) on 9,216 random tokens, 4 times
  full  a 114-frame video read by the Streamer, and a question
  clear jax.clear_caches() and gc (drops every executable, the decode loops' too)
  ssd_IMPL  the SSD forward alone (kernels.ssd.api.ssd, impl=IMPL) at the 2.7B shapes on
        9,216 tokens, 4 times
  droplm  drops the lm stage's jitted function and its executable (clear_cache, gc)
  lmcompile  the lm stage's function compiled (lower().compile()) and kept, never run
  dropall  drops every kept stage function and executable, and JAX's Python-level caches
        (jax._src.util.clear_all_caches; the C++ dispatch caches, which hold the decode
        loops' executables, are kept), then gc
  tiny  200 distinct small executables compiled, run once and kept (many loaded modules,
        little work; not run in session 13; no slowdown in session 14, call e)
  alloc  a 20 GiB array made, written and freed (memory traffic and allocator churn, no
        large executable; not run in session 13; no slowdown in session 14, call e)
  newsampler  a new Sampler (its loops compiled afresh) times the answers from then on
NOGRAPH=1 compiles the enc/lm/full executables without XLA command buffers (CUDA graphs).
BOTH=1 (needs reuse_buffers.patch, applied in call c only and not committed: it changed
nothing) times two samplers at each stage: reuse_buffers=True (every answer's loop on the
same buffers) and False (each answer on fresh ones), and the median time of a 4-token
answer (most of it the fixed cost of an answer).
PROFILE=1 profiles one 1024-token answer first and last (kernels a token, side by side).
  ORDER=enc,lm,full,clear [NOGRAPH=1] [PROFILE=1] python docs/bench/h100_r13/after_prefill.py"""
import gc
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.bench import kernel_profile
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.kernels.ssd.api import ssd
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.video_lm import fast_vision_attention, with_vision_attention

NOGRAPH = os.environ.get("NOGRAPH") == "1"
OPTIONS = {"xla_gpu_enable_command_buffer": ""} if NOGRAPH else None
PRESET = os.environ.get("PRESET", "3.1b")
BIG = PRESET == "3.1b"
LENGTHS = (256, 1024) if BIG else (4, 8)
FRAMES, ENC_FRAMES, LM_TOKENS = (114, 64, 9216) if BIG else (8, 4, 64)


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=OPTIONS, **kw) if NOGRAPH else jax.jit(fn, **kw)


def median_seconds(sampler, states, logits, n, repeats=3):
  """Median wall seconds of a greedy n-token answer (after one untimed answer)."""
  params = SamplingParams(max_new_tokens=n, stop_on_repeat=False)
  sampler.generate(states, logits, params)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    assert len(sampler.generate(states, logits, params).sampled) == n
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def tiny_executables(keep: dict, jit=jax.jit, count: int = 200) -> None:
  """The 'tiny' stage: `count` distinct small executables compiled, run once and kept."""
  small = jnp.ones((1024,), jnp.float32)
  for i in range(count):
    fn = jit(lambda v, i=i: jnp.sin(v * (i + 1)) + i)
    jax.block_until_ready(fn(small))
    keep[f"tiny{i}"] = fn


def make_and_free(gib: int = 20) -> None:
  """The 'alloc' stage: a `gib` GiB f32 array made, written and freed."""
  big = jnp.zeros((gib * 1024 ** 3 // 4,), jnp.float32) + 1.0
  jax.block_until_ready(big)
  del big
  gc.collect()


def decode_setup(preset: str = PRESET):
  """(tokenizer, model, zero states, logits): a small BPE tokenizer, the preset's VideoMa2mba
  (random bf16 weights), the LM's zero states (batch 1) and random first-token logits: what
  the session 13-15 scripts decode from."""
  tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
  model = bench_infer.build_model(preset, "bfloat16", "bfloat16", "auto", vocab_size(tokenizer))
  zero = model.llm.init_states(1)
  logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
  return tokenizer, model, zero, logits


def run_four(fn, *args):
  """fn(*args) four times (the first compiles it), waited for; returns fn (to be kept)."""
  for _ in range(4):
    out = fn(*args)
  jax.block_until_ready(out)
  return fn


def layers_of(llm):
  """(layers(params, ids, states): the LM layers on the embedded ids, llm's params)."""
  graphdef, params = nnx.split(llm)

  def layers(p, ids, s):
    merged = nnx.merge(graphdef, p)
    return merged.apply_layers(merged.embed(ids), s)

  return layers, params


def ssd_inputs(tokens: int) -> tuple:
  """Random (x, dt, A, B, C) for kernels.ssd.api.ssd at the 2.7B shapes (80 heads of 64,
  one group, state 128) on `tokens` tokens."""
  keys = jax.random.split(jax.random.key(4), 5)
  return (jax.random.normal(keys[0], (1, tokens, 80, 64), jnp.bfloat16),
          jax.random.normal(keys[1], (1, tokens, 80), jnp.float32),
          -jnp.exp(jax.random.normal(keys[2], (80,), jnp.float32)),
          jax.random.normal(keys[3], (1, tokens, 1, 128), jnp.bfloat16),
          jax.random.normal(keys[4], (1, tokens, 1, 128), jnp.bfloat16))


def rates(sampler, states, logits, label, results):
  if isinstance(sampler, dict):
    for name, one in sampler.items():
      rates(one, states, logits, f"{label} [{name}]", results)
    return
  start = time.perf_counter()
  sampler.generate(states, logits, SamplingParams(max_new_tokens=4, stop_on_repeat=False))
  print(f"  (first 4-token answer {time.perf_counter() - start:.2f} s: a recompile if long)")
  four = median_seconds(sampler, states, logits, 4, repeats=7)
  row = {n: median_seconds(sampler, states, logits, n) for n in LENGTHS}
  per_token = (row[LENGTHS[1]] - row[LENGTHS[0]]) / (LENGTHS[1] - LENGTHS[0])
  results.append((label, row, per_token))
  print(f"{label:40s} " + "  ".join(f"{n} tok {n / s:6.1f} tok/s" for n, s in row.items())
        + f"  marginal {per_token * 1e3:.4f} ms/token ({1 / per_token:.1f} tok/s)"
        + f"  4 tok {four * 1e3:.2f} ms", flush=True)


def profiled(sampler, states, logits, tag):
  params = SamplingParams(max_new_tokens=LENGTHS[1], stop_on_repeat=False)
  rows, _ = kernel_profile.profile_steps(lambda: sampler.generate(states, logits, params).sampled,
                                         f"/tmp/prof_{tag}", LENGTHS[1], f"answer {tag}", top=12)
  return {r["kernel"]: r["us/call"] for r in rows}


def main():
  tokenizer, model, zero, logits = decode_setup()
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  if os.environ.get("BOTH") == "1":
    sampler = {"reuse": sampler,
               "fresh": Sampler(model.llm, vocab_size=vocab_size(tokenizer),
                                step_impl="fused_mixed", reuse_buffers=False)}
  results = []
  print(f"NOGRAPH={NOGRAPH}", flush=True)
  before = profiled(sampler, zero, logits, "first") if os.environ.get("PROFILE") == "1" else None
  rates(sampler, zero, logits, "A before anything", results)
  vision_model = with_vision_attention(model, fast_vision_attention(model.config))
  graphdef, params = nnx.split(vision_model)
  frames = jax.random.randint(jax.random.key(2), (ENC_FRAMES, model.config.image_size,
                              model.config.image_size, 3), 0, 255).astype(jnp.uint8)
  keep = {}
  for stage in os.environ.get("ORDER", "enc,lm,full,clear").split(","):
    start = time.perf_counter()
    if stage.startswith("ssd_"):
      keep[stage] = run_four(jit(lambda *args: ssd(*args, impl=stage[4:])),
                             *ssd_inputs(LM_TOKENS))
    elif stage == "lmcompile":
      layers, llm_params = layers_of(model.llm)
      ids = jax.random.randint(jax.random.key(3), (1, LM_TOKENS), 0, 250)
      keep["lmc"] = jit(layers).lower(llm_params, ids, zero).compile()
      del llm_params, ids
    elif stage == "tiny":
      tiny_executables(keep, jit)
    elif stage == "alloc":
      make_and_free()
    elif stage == "dropall":
      from jax._src import util
      keep.clear()
      util.clear_all_caches()
      gc.collect()
    elif stage == "droplm":
      keep.pop("lm").clear_cache()
      gc.collect()
    elif stage == "newsampler":
      sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
    elif stage == "enc":
      run_four(jit(lambda p, f: nnx.merge(graphdef, p).encode_images(f)), params, frames)
    elif stage == "lm":
      layers, llm_params = layers_of(model.llm)
      embeds = jax.random.randint(jax.random.key(3), (1, LM_TOKENS), 0, 250)
      keep["lm"] = run_four(jit(layers), llm_params, embeds, zero)
      del embeds, llm_params
    elif stage == "full":
      streamer = Streamer(model, tokenizer, frames_per_step=64)
      if NOGRAPH:
        for name in ("_frames_step", "_text_step", "_token_step", "_score_step"):
          setattr(streamer, name, jit(getattr(streamer, name).__wrapped__))
      batches = bench_infer.frame_batches(FRAMES, 64, streamer.image_size)
      conv = streamer.read_frames(batches, FRAMES)
      conv = streamer.ask(conv, bench_infer.QUESTION)
      jax.block_until_ready(conv.logits)
      del conv, streamer
    elif stage == "clear":
      jax.clear_caches()
      gc.collect()
    print(f"stage {stage}: {time.perf_counter() - start:.1f} s", flush=True)
    rates(sampler, zero, logits, f"after {stage}", results)
  if before is not None:
    after = profiled(sampler, zero, logits, "last")
    print("\nkernel us/token: first profile, last profile, change")
    for name in sorted(before, key=before.get, reverse=True)[:12]:
      print(f"  {before[name]:9.2f} {after.get(name, 0.0):9.2f} "
            f"{after.get(name, 0.0) - before[name]:+8.2f}  {name[:90]}")
    print(f"  {sum(before.values()):9.2f} {sum(after.values()):9.2f} total")


if __name__ == "__main__":
  main()
