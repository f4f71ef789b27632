"""Inference benchmark: a video of L tokens streamed into the model, then an answer decoded,
against L. Random weights and random frames made in memory (no video file, no checkpoint).

  python -m ma2mba_jax.bench.infer --preset=3.1b \
      --lengths=16384,131072,524288,2097152 --json=bench_out/infer.json      # one 80 GB GPU
  python -m ma2mba_jax.bench.infer --preset=tiny --lengths=64,256,1024      # CPU, seconds

A length L is the video's tokens, ceil(L / K) frames of K tokens (K = 144 for the paper's
models: 2,097,152 tokens = 14,564 frames, about 4 h at 1 FPS). Each run goes through the same
code as `generate`: Streamer.read_frames (system prompt, then the frames M = --frames_per_step
at a time: encoder + LM layers in one jitted step, states carried), Streamer.ask (a question),
then Sampler.generate (--decode_tokens greedy tokens, no stop rule) --decode_repeats times
per --decode_impls loop, from the same state (the decode columns: their median).

Columns:
  frames/s, prefill tok/s   end to end over the whole video (encoding included), wall time
                            from the first frame queued to the states ready (the random
                            frames are made before: `frame_pool`; until session 16 the
                            time also held their making, 0.4-0.6 s on a 2-core CPU);
  decode tok/s host        recurrent decoding, one jitted step and one host sync per token,
                            the step unrolled over per-layer weights (models/decode.py);
  decode tok/s host_scan   the same with `Mamba2LM.step` (a scan over the stacked layers):
                            the host loop before issue 19's fix;
  decode tok/s device      the on-device loop (lax.while_loop: step, choice and stop checks
                            on the device, the whole answer in one dispatch), its LM step
                            unrolled over per-layer weights (models/decode.py);
  decode tok/s device_scan the same loop with `Mamba2LM.step` (a scan over the stacked
                            layers) as its step: the device loop before issue 19's fix;
  decode tok/s device_fused the device loop with `models/decode.fused_decode_step` (one
                            kernel for each layer's middle; host_fused: the host loop;
                            _fused_gemv: the matmuls and norms as kernels too;
                            _fused_reduce: in_proj as XLA's multiply-and-reduce, out_proj
                            the Pallas kernel;
                            _fused_mixed: fused_reduce for one row, fused for more, the
                            Sampler's default on GPU);
  same tokens               whether the host and device loops of the same step decoded the
                            same greedy tokens ('-': no step ran in both loops, e.g.
                            host_fused_mixed beside device_fused_mixed; until session 17 this
                            column said True then);
  scan parts at             the first token where the scanned step's greedy answer differs
                            from the unrolled step's ('-': nowhere; both compute the same
                            function, but XLA fuses them differently on GPU);
  peak GB                   the device allocator's peak since the process started (weights,
                            two copies of the states, one step's activations); lengths run in
                            increasing order, so a flat column means a longer video never
                            needed more memory than a shorter one;
  live GB                   device memory in use after the prefill (weights + states).
The first table times one frame step's parts, the encoder alone (frames/s; with each
--vision_attention: the first is the one the videos stream with, 'auto' = the Streamer's
default, cuDNN flash attention on a GPU in bf16) and the LM layers alone (tokens/s), and
gives XLA's compiled plan for the frame step (temporaries + outputs + non-parameter inputs;
the same for every length, as only fixed shapes are compiled). --profile_dir adds the top
GPU kernels (bench/kernel_profile.py) of the encoder step, the LM layers' step and each
device decode loop (per token, from one more answer after the timed ones at each length;
column gpu ms/token, their GPU time a token against the wall time of decode tok/s; column
gpu span ms/token, the first kernel's start to the last one's end: its excess over gpu
ms/token is the GPU waiting between kernels, printed by gap size). Weights are made on the
host and moved to the device already cast (--param_dtype), so the weights' f32 init never
inflates the device peak. There are no allocator stats on CPU ('-').
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from ma2mba_jax.bench import common, kernel_profile
from ma2mba_jax.bench.frames import frame_batches, frame_pool
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.checkpoint import cast_matrices, inference_ssd_impl
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.decode import decode_step
from ma2mba_jax.models.video_lm import VideoMa2mba, fast_vision_attention, with_vision_attention
from ma2mba_jax.models.video_presets import video_config

_PRESET = flags.DEFINE_string("preset", "3.1b", "Video-Ma2mba preset (0.7b, 1.8b, 3.1b, tiny).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Video lengths in tokens (frames x K); default "
                             "16384,131072,524288,2097152 (tiny: 64,256,1024).")
_FRAMES_PER_STEP = flags.DEFINE_list("frames_per_step", ["16"], "Frames per prefill step (M); "
                                      "several: a table row per (M, length).")
_LAYER_LOOPS = flags.DEFINE_list("layer_loops", ["scan"], "How a frame step runs the LM's "
                                 "layers (Streamer's layer_loop: scan, unrolled); several: a "
                                 "table row per (loop, M, length).")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write the optimized HLO of the decode steps "
                               "and the frame step here, with their kernel counts.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 64, "Tokens decoded after the prefill.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["float32", "bfloat16"],
                                   "Matmul / SSD input dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["float32", "bfloat16"],
                                 "Dtype of the weight matrices (vectors stay f32).")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "", "SSD backend: auto | xla | pallas | triton "
                                "(default: what generate and evaluate run, "
                                "infer.checkpoint.inference_ssd_impl: pallas on a GPU).")
_DECODE_IMPLS = flags.DEFINE_list("decode_impls", ["host", "device"], "Decoding loops to "
                                  "time (infer/sample.py), each from the same state: host, "
                                  "device, host_scan, device_scan, host_fused, device_fused.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each step part (median).")
_DECODE_REPEATS = flags.DEFINE_integer("decode_repeats", 1, "Answers decoded per length and "
                                       "loop, from the same state; the decode columns are "
                                       "their median, each answer's time is logged.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_VISION_ATTENTION = flags.DEFINE_list(
    "vision_attention", ["auto"], "Encoder attention implementations (auto: the Streamer's "
    "default, cuDNN on a GPU in bf16; default: JAX's choice; xla; cudnn); the first streams "
    "the videos, each is timed in the parts table.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Profile the encoder step, the LM layers' step and each device "
    "decode loop (bench/kernel_profile.py) into this folder and print their top kernels: "
    "the decode loops' from one more answer at each length, after the timed ones (same "
    "state); columns 'gpu ms/token <loop>', its kernels' GPU time a token (against the "
    "wall time), and 'gpu span ms/token <loop>' (first kernel's start to last one's end).")

QUESTION = "What happens in the video?"
_GB, _MB = 1e9, 1e6


def _attention(name: str, config) -> str | None:
  """--vision_attention's name -> VideoConfig.vision_attention."""
  return {"auto": fast_vision_attention(config), "default": None}.get(name, name)


def build_model(preset: str, compute_dtype: str, param_dtype: str, ssd_impl: str,
                min_vocab: int) -> VideoMa2mba:
  """Random weights, initialised on the host, cast, then put on the default device. The LM
  embeds at least `min_vocab` ids (the tiny preset's 250 are fewer than a BPE tokenizer's)."""
  start = time.perf_counter()
  config = video_config(preset, compute_dtype=compute_dtype, ssd_impl=ssd_impl)
  if config.llm_config.vocab_size < min_vocab:
    config = dataclasses.replace(config, llm_vocab_size=min_vocab)
  abstract = nnx.eval_shape(lambda: VideoMa2mba(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    state = jax.jit(lambda: nnx.state(VideoMa2mba(config, rngs=nnx.Rngs(0))))()
    model = cast_matrices(nnx.merge(graphdef, state), jnp.dtype(param_dtype))
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.block_until_ready(jax.device_put(state, jax.devices()[0])))
  logging.info("random %s weights made on the host and moved in %.1f s", preset,
               time.perf_counter() - start)
  return model


def time_step_parts(model: VideoMa2mba, m: int, repeats: int, attentions: list[str],
                    profile_dir: str | None = None) -> dict[str, float]:
  """Median time of one step's encoder (M frames; with each encoder attention of
  `attentions`) and LM layers (M*K tokens) alone; their top kernels if `profile_dir`."""
  k, d, s = model.config.tokens_per_frame, model.llm.config.d_model, model.config.image_size
  graphdef, params = nnx.split(model)
  layers = jax.jit(lambda p, h, st: nnx.merge(graphdef, p).llm.apply_layers(h, st)[1])
  frames = jnp.asarray(next(frame_batches(m, m, s)))
  embeds = jax.random.normal(jax.random.key(0), (1, m * k, d), jnp.float32)
  states = model.llm.init_states(1)
  out = {"encoder attention": str(_attention(attentions[0], model.config))}
  for name in attentions:
    encoder_graphdef, _ = nnx.split(with_vision_attention(model,
                                                          _attention(name, model.config)))
    encode = jax.jit(lambda p, f, g=encoder_graphdef: nnx.merge(g, p).encode_images(f))
    suffix = "" if name == attentions[0] else f" ({name} attention)"
    try:
      encode_ms = common.median_ms(lambda: encode(params, frames), repeats=repeats)
    except Exception as e:  # e.g. no cuDNN kernel for these shapes: a result, not a crash
      if not suffix:
        raise
      logging.warning("encoder with %s attention failed: %s", name, e)
      out[f"encoder frames/s{suffix}"] = f"failed: {type(e).__name__}"
      continue
    out[f"encoder frames/s{suffix}"] = m / (encode_ms / 1e3)
    out[f"encoder ms/step{suffix}"] = encode_ms
    if profile_dir:
      kernel_profile.print_rows(f"encoder, M={m}, {name} attention", kernel_profile.profile(
          lambda: encode(params, frames), os.path.join(profile_dir, f"encoder_{name}")))
  layers_ms = common.median_ms(lambda: layers(params, embeds, states), repeats=repeats)
  if profile_dir:
    kernel_profile.print_rows(f"LM layers, {m * k} tokens", kernel_profile.profile(
        lambda: layers(params, embeds, states), os.path.join(profile_dir, "layers")))
  return {**out, "LM layers tok/s": m * k / (layers_ms / 1e3), "LM layers ms/step": layers_ms}


def dump_hlo(directory: str, name: str, jitted, *args) -> dict[str, int]:
  """Writes jitted(*args)'s optimized HLO to directory/name.hlo; returns kernel_counts."""
  os.makedirs(directory, exist_ok=True)
  text = jitted.lower(*args).compile().as_text()
  with open(os.path.join(directory, f"{name}.hlo"), "w") as f:
    f.write(text)
  counts = common.kernel_counts(text)
  with open(os.path.join(directory, f"{name}.kernels.json"), "w") as f:
    json.dump(counts, f, indent=1)
  return counts


def step_hlo(model: VideoMa2mba, streamer: Streamer, sampler: Sampler, directory: str,
             decode: bool = True) -> dict[str, int]:
  """Dumps the decode step (scanned and unrolled; if `decode`) and the frame step -> the
  kernels each launches (all computations; the while body of a scan is one layer) and
  those of its largest computation."""
  llm = model.llm
  graphdef, params = nnx.split(llm)
  block_graphdef = llm.split_layers()[0]
  cache = llm.init_states(1)
  token = jnp.zeros((1,), jnp.int32)
  scan = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))
  unrolled = jax.jit(lambda w, t, c: decode_step(llm.config, block_graphdef, w, t, c))
  out = {}
  steps = (("decode_step_scan", scan, params),
           ("decode_step_unrolled", unrolled, sampler.device_weights()))
  for name, fn, first in steps if decode else ():
    counts = dump_hlo(directory, name, fn, first, token, cache)
    out[f"{name} kernels"] = sum(counts.values())
    out[f"{name} kernels max computation"] = max(counts.values())
  frames = jnp.zeros((streamer.frames_per_step, model.config.image_size,
                      model.config.image_size, 3), jnp.uint8)
  counts = dump_hlo(directory, f"frames_step_{streamer.layer_loop}", streamer._frames_step,
                    streamer._frame_params, cache, frames)
  out[f"frames_step_{streamer.layer_loop} kernels"] = sum(counts.values())
  return out


def run_length(streamer: Streamer, samplers: dict[str, Sampler], tokens: int,
               decode_tokens: int, decode_impls: list[str],
               profile_dir: str | None = None) -> dict[str, float]:
  """One video of `tokens` tokens: prefill, question, decoding; timings and memory. With
  profile_dir, one more answer of each device loop is profiled after the timed ones (same
  state): its top kernels, GPU time per token (gpu ms/token) against the wall time, and
  the GPU's waits between kernels (gpu span ms/token)."""
  k, m = streamer.tokens_per_frame, streamer.frames_per_step
  frames = math.ceil(tokens / k)
  frame_pool(m, streamer.image_size)  # made before the clock starts (cached)
  start = time.perf_counter()
  conv = streamer.read_frames(frame_batches(frames, m, streamer.image_size), frames)
  jax.block_until_ready(conv.states)
  prefill_s = time.perf_counter() - start
  live = common.device_memory_stats().get("bytes_in_use")
  conv = streamer.ask(conv, QUESTION)
  jax.block_until_ready(conv.logits)
  params = SamplingParams(max_new_tokens=decode_tokens, stop_on_repeat=False)
  decoded, sampled = {}, {}
  for impl in decode_impls:
    answer = lambda i=impl: samplers[i].generate(conv.states, conv.logits, params,
                                                 decode_impl=i.split("_")[0]).sampled
    rates = []
    for _ in range(max(_DECODE_REPEATS.value, 1)):
      start = time.perf_counter()
      sampled[impl] = answer()
      rates.append(len(sampled[impl]) / (time.perf_counter() - start))
    logging.info("decode %s, %d tokens: %s tok/s", impl, decode_tokens,
                 ", ".join(f"{r:.1f}" for r in rates))
    decoded[f"decode tok/s {impl}"] = float(np.median(rates))
    if profile_dir and impl.startswith("device"):   # one more answer: its kernels a token
      rows, timeline = kernel_profile.profile_steps(
          answer, os.path.join(profile_dir, f"{impl}_{tokens}"), decode_tokens,
          f"decode {impl}, {tokens}-token video", top=30)
      decoded[f"gpu ms/token {impl}"] = sum(r["us/call"] for r in rows) / 1e3
      if timeline:   # first kernel's start to the last one's end, a token
        decoded[f"gpu span ms/token {impl}"] = timeline["span us/call"] / decode_tokens / 1e3
  by_step = {}
  for impl, tokens in sampled.items():
    by_step.setdefault(impl.partition("_")[2] or "unrolled", []).append(tokens)
  pairs = [group for group in by_step.values() if len(group) > 1]   # a step in both loops
  same = all(t == group[0] for group in pairs for t in group) if pairs else None
  parts = {}
  for step in ("scan", "fused", "fused_gemv", "fused_reduce", "fused_mixed"):
    if step in by_step and "unrolled" in by_step:
      unrolled, other = by_step["unrolled"][0], by_step[step][0]
      parts[f"{step} parts at"] = next(
          (i for i, (a, b) in enumerate(zip(unrolled, other)) if a != b), "-")
  peak = common.device_memory_stats().get("peak_bytes_in_use")
  return {"M": m, "tokens": frames * k, "frames": frames, "prefill s": prefill_s,
          "frames/s": frames / prefill_s, "prefill tok/s": frames * k / prefill_s,
          **decoded, "same tokens": same, **parts,
          "peak GB": None if peak is None else peak / _GB,
          "live GB": None if live is None else live / _GB}


def write_results(rows: list[dict], parts: dict, impls: list[str], ssd_impl: str) -> None:
  common.write_json(_JSON.value, {
      "bench": "infer", "preset": _PRESET.value, "compute_dtype": _COMPUTE_DTYPE.value,
      "param_dtype": _PARAM_DTYPE.value, "ssd_impl": ssd_impl,
      "frames_per_step": _FRAMES_PER_STEP.value,
      "layer_loops": _LAYER_LOOPS.value, "decode_tokens": _DECODE_TOKENS.value,
      "decode_impls": impls, "step_parts": parts, "rows": rows,
      "environment": common.environment()})


def main(argv):
  del argv
  lengths = _LENGTHS.value or (["64", "256", "1024"] if _PRESET.value == "tiny" else
                               ["16384", "131072", "524288", "2097152"])
  lengths = sorted(int(x) for x in lengths)
  # Random weights need no real tokenizer: a tiny one provides the chat template's ids.
  tokenizer = train_tokenizer([SYSTEM_PROMPT, QUESTION], vocab_size=300)
  ssd_impl = inference_ssd_impl("auto", _SSD_IMPL.value)   # pallas on a GPU unless asked
  model = build_model(_PRESET.value, _COMPUTE_DTYPE.value, _PARAM_DTYPE.value, ssd_impl,
                      vocab_size(tokenizer))
  impls = _DECODE_IMPLS.value
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="unrolled")
  scan_sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="scan")
  samplers = {"host": sampler, "device": sampler, "host_scan": scan_sampler,
              "device_scan": scan_sampler}
  for step in ("fused", "fused_gemv", "fused_reduce", "fused_mixed"):
    if f"host_{step}" in impls or f"device_{step}" in impls:
      samplers[f"host_{step}"] = samplers[f"device_{step}"] = Sampler(
          model.llm, vocab_size=vocab_size(tokenizer), step_impl=step)
  unknown = set(impls) - set(samplers)
  if unknown:
    raise app.UsageError(f"--decode_impls: unknown {sorted(unknown)}; expected some of "
                         f"host, device, host_scan, device_scan, host_fused, device_fused, "
                         f"host_fused_gemv, device_fused_gemv, host_fused_reduce, "
                         f"device_fused_reduce, host_fused_mixed, device_fused_mixed")
  # The unrolled frame step reads the weights the Sampler already split per layer.
  weights = sampler.device_weights() if "unrolled" in _LAYER_LOOPS.value else None
  rows, parts = [], {}
  sizes = [int(x) for x in _FRAMES_PER_STEP.value]
  for loop, m in itertools.product(_LAYER_LOOPS.value, sizes):
    streamer = Streamer(model, tokenizer, frames_per_step=m, layer_loop=loop,
                        weights=weights, vision_attention=_attention(
                            _VISION_ATTENTION.value[0], model.config))
    logging.info("%s: %s parameters, K=%d tokens per frame, M=%d frames per step",
                 _PRESET.value, f"{model.llm.num_params():,}+vision",
                 streamer.tokens_per_frame, m)
    # Compile every step shape once before timing: M frames, then the last M - 1 frames'
    # power-of-two steps (M/2, ..., 1; infer/stream.remainder_steps), text, decoding.
    start = time.perf_counter()
    run_length(streamer, samplers, (2 * m - 1) * streamer.tokens_per_frame,
               _DECODE_TOKENS.value, impls)
    parts[f"{loop} M={m} warm-up s"] = time.perf_counter() - start
    if not parts.get("encoder frames/s"):
      parts.update(time_step_parts(model, m, _REPEATS.value, _VISION_ATTENTION.value,
                                   _PROFILE_DIR.value))
    if _HLO_DIR.value and m == sizes[0]:
      parts.update(step_hlo(model, streamer, sampler, _HLO_DIR.value,
                            decode="decode_step_scan kernels" not in parts))
    parts[f"{loop} M={m} step plan MB"] = max(streamer.step_footprints(m + 1).values()) / _MB
    for length in lengths:
      try:
        row = run_length(streamer, samplers, length, _DECODE_TOKENS.value, impls,
                         _PROFILE_DIR.value)
        row = {"loop": loop, **row}
      except Exception as e:  # report an OOM as a row, keep the table
        if not common.is_oom(e):
          raise
        row = {"loop": loop, "M": m, "tokens": length,
               "frames": math.ceil(length / streamer.tokens_per_frame), "prefill s": "OOM"}
      logging.info("%s", row)
      rows.append(row)
      write_results(rows, parts, impls, ssd_impl)  # so far, should a later row not finish

  print(f"\n{_PRESET.value}, {_COMPUTE_DTYPE.value} compute, {_PARAM_DTYPE.value} weights, "
        f"K={streamer.tokens_per_frame} tokens/frame, "
        f"{common.environment()['device']}")
  common.print_table([parts], list(parts))
  print()
  columns = ["loop", "M", "tokens", "frames", "prefill s", "frames/s", "prefill tok/s",
             *[f"decode tok/s {impl}" for impl in impls],
             *[f"gpu {what}ms/token {impl}" for impl in impls for what in ("", "span ")
               if _PROFILE_DIR.value and impl.startswith("device")],
             "same tokens", "scan parts at",
             "fused parts at", "fused_gemv parts at", "fused_reduce parts at",
             "fused_mixed parts at",
             "peak GB", "live GB"]
  write_results(rows, parts, impls, ssd_impl)
  common.print_table(rows, columns)


if __name__ == "__main__":
  app.run(main)
