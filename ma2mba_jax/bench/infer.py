"""Inference benchmark: a video of L tokens streamed into the model, then an answer decoded,
against L. Random weights and random frames made in memory (no video file, no checkpoint).

  python -m ma2mba_jax.bench.infer --preset=3.1b \
      --lengths=16384,131072,524288,2097152 --json=bench_out/infer.json      # one 80 GB GPU
  python -m ma2mba_jax.bench.infer --preset=tiny --lengths=64,256,1024      # CPU, seconds

A length L is the video's tokens, ceil(L / K) frames of K tokens (K = 144 for the paper's
models: 2,097,152 tokens = 14,564 frames, about 4 h at 1 FPS). Each run goes through the same
code as `generate`: Streamer.read_frames (system prompt, then the frames M = --frames_per_step
at a time: encoder + LM layers in one jitted step, states carried), Streamer.ask (a question),
then Sampler.generate (--decode_tokens greedy tokens, no stop rule) once per
--decode_impls loop, from the same state.

Columns:
  frames/s, prefill tok/s   end to end over the whole video (encoding included), wall time
                            from the first frame queued to the states ready;
  decode tok/s host        recurrent decoding, one jitted step and one host sync per token;
  decode tok/s device      the on-device loop (lax.while_loop: step, choice and stop checks
                            on the device, the whole answer in one dispatch);
  same tokens               whether the loops decoded the same greedy tokens;
  peak GB                   the device allocator's peak since the process started (weights,
                            two copies of the states, one step's activations); lengths run in
                            increasing order, so a flat column means a longer video never
                            needed more memory than a shorter one;
  live GB                   device memory in use after the prefill (weights + states).
The first table times one frame step's parts, the encoder alone (frames/s) and the LM layers
alone (tokens/s), and gives XLA's compiled plan for the frame step (temporaries + outputs +
non-parameter inputs; the same for every length, as only fixed shapes are compiled).
Weights are made on the host and moved to the device already cast (--param_dtype), so the
weights' f32 init never inflates the device peak. There are no allocator stats on CPU ('-').
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from ma2mba_jax.bench import common
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.checkpoint import cast_matrices
from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config

_PRESET = flags.DEFINE_string("preset", "3.1b", "Video-Ma2mba preset (0.7b, 1.8b, 3.1b, tiny).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Video lengths in tokens (frames x K); default "
                             "16384,131072,524288,2097152 (tiny: 64,256,1024).")
_FRAMES_PER_STEP = flags.DEFINE_integer("frames_per_step", 16, "Frames per prefill step (M).")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 64, "Tokens decoded after the prefill.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["float32", "bfloat16"],
                                   "Matmul / SSD input dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["float32", "bfloat16"],
                                 "Dtype of the weight matrices (vectors stay f32).")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "auto", "SSD backend: auto | xla | pallas | triton.")
_DECODE_IMPLS = flags.DEFINE_list("decode_impls", ["host", "device"], "Decoding loops to "
                                  "time (infer/sample.py), each from the same state.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each step part (median).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")

QUESTION = "What happens in the video?"
_GB, _MB = 1e9, 1e6


def build_model(preset: str, compute_dtype: str, param_dtype: str, ssd_impl: str,
                min_vocab: int) -> VideoMa2mba:
  """Random weights, initialised on the host, cast, then put on the default device. The LM
  embeds at least `min_vocab` ids (the tiny preset's 250 are fewer than a BPE tokenizer's)."""
  start = time.perf_counter()
  config = video_config(preset, compute_dtype=compute_dtype, ssd_impl=ssd_impl)
  if config.llm_config.vocab_size < min_vocab:
    config = video_config(preset, compute_dtype=compute_dtype, ssd_impl=ssd_impl,
                          llm_vocab_size=min_vocab)
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


def frame_batches(total: int, m: int, size: int, seed: int = 0) -> Iterator[np.ndarray]:
  """`total` random frames as uint8 [m, S, S, 3] batches (the last may be shorter), cycling
  through a few distinct batches so the host does no per-frame work."""
  rng = np.random.default_rng(seed)
  pool = [rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8) for _ in range(4)]
  for i, start in enumerate(range(0, total, m)):
    yield pool[i % len(pool)][:min(m, total - start)]


def time_step_parts(model: VideoMa2mba, m: int, repeats: int) -> dict[str, float]:
  """Median time of one step's encoder (M frames) and LM layers (M*K tokens) alone."""
  k, d, s = model.config.tokens_per_frame, model.llm.config.d_model, model.config.image_size
  graphdef, params = nnx.split(model)
  encode = jax.jit(lambda p, f: nnx.merge(graphdef, p).encode_images(f))
  layers = jax.jit(lambda p, h, st: nnx.merge(graphdef, p).llm.apply_layers(h, st)[1])
  frames = jnp.asarray(next(frame_batches(m, m, s)))
  embeds = jax.random.normal(jax.random.key(0), (1, m * k, d), jnp.float32)
  states = model.llm.init_states(1)
  encode_ms = common.median_ms(lambda: encode(params, frames), repeats=repeats)
  layers_ms = common.median_ms(lambda: layers(params, embeds, states), repeats=repeats)
  return {"encoder frames/s": m / (encode_ms / 1e3), "encoder ms/step": encode_ms,
          "LM layers tok/s": m * k / (layers_ms / 1e3), "LM layers ms/step": layers_ms}


def run_length(streamer: Streamer, sampler: Sampler, tokens: int, decode_tokens: int,
               decode_impls: list[str]) -> dict[str, float]:
  """One video of `tokens` tokens: prefill, question, decoding; timings and memory."""
  k, m = streamer.tokens_per_frame, streamer.frames_per_step
  frames = math.ceil(tokens / k)
  start = time.perf_counter()
  conv = streamer.read_frames(frame_batches(frames, m, streamer.image_size), frames)
  jax.block_until_ready(conv.states)
  prefill_s = time.perf_counter() - start
  live = common.device_memory_stats().get("bytes_in_use")
  conv = streamer.ask(conv, QUESTION)
  jax.block_until_ready(conv.logits)
  decoded, sampled = {}, []
  for impl in decode_impls:
    start = time.perf_counter()
    generation = sampler.generate(conv.states, conv.logits, SamplingParams(
        max_new_tokens=decode_tokens, stop_on_repeat=False), decode_impl=impl)
    decoded[f"decode tok/s {impl}"] = len(generation.sampled) / (time.perf_counter() - start)
    sampled.append(generation.sampled)
  peak = common.device_memory_stats().get("peak_bytes_in_use")
  return {"tokens": frames * k, "frames": frames, "prefill s": prefill_s,
          "frames/s": frames / prefill_s, "prefill tok/s": frames * k / prefill_s,
          **decoded, "same tokens": all(s == sampled[0] for s in sampled),
          "peak GB": None if peak is None else peak / _GB,
          "live GB": None if live is None else live / _GB}


def main(argv):
  del argv
  lengths = _LENGTHS.value or (["64", "256", "1024"] if _PRESET.value == "tiny" else
                               ["16384", "131072", "524288", "2097152"])
  lengths = sorted(int(x) for x in lengths)
  # Random weights need no real tokenizer: a tiny one provides the chat template's ids.
  tokenizer = train_tokenizer([SYSTEM_PROMPT, QUESTION], vocab_size=300)
  model = build_model(_PRESET.value, _COMPUTE_DTYPE.value, _PARAM_DTYPE.value, _SSD_IMPL.value,
                      vocab_size(tokenizer))
  m = _FRAMES_PER_STEP.value
  streamer = Streamer(model, tokenizer, frames_per_step=m)
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer))
  logging.info("%s: %s parameters, K=%d tokens per frame, M=%d frames per step",
               _PRESET.value, f"{model.llm.num_params():,}+vision", streamer.tokens_per_frame, m)

  # Compile every step shape once (M frames, 1 frame, text, decoding) before timing.
  impls = _DECODE_IMPLS.value
  run_length(streamer, sampler, (m + 1) * streamer.tokens_per_frame, _DECODE_TOKENS.value,
             impls)
  parts = time_step_parts(model, m, _REPEATS.value)
  parts["step plan MB"] = max(streamer.step_footprints(m + 1).values()) / _MB
  rows = []
  for length in lengths:
    try:
      row = run_length(streamer, sampler, length, _DECODE_TOKENS.value, impls)
    except Exception as e:  # report an OOM as a row, keep the table
      if not common.is_oom(e):
        raise
      row = {"tokens": length, "frames": math.ceil(length / streamer.tokens_per_frame),
             "prefill s": "OOM"}
    logging.info("%s", row)
    rows.append(row)

  print(f"\n{_PRESET.value}, {_COMPUTE_DTYPE.value} compute, {_PARAM_DTYPE.value} weights, "
        f"M={m} frames/step, K={streamer.tokens_per_frame} tokens/frame, "
        f"{common.environment()['device']}")
  common.print_table([parts], list(parts))
  print()
  columns = ["tokens", "frames", "prefill s", "frames/s", "prefill tok/s",
             *[f"decode tok/s {impl}" for impl in impls], "same tokens", "peak GB", "live GB"]
  common.write_json(_JSON.value, {
      "bench": "infer", "preset": _PRESET.value, "compute_dtype": _COMPUTE_DTYPE.value,
      "param_dtype": _PARAM_DTYPE.value, "frames_per_step": m,
      "tokens_per_frame": streamer.tokens_per_frame, "decode_tokens": _DECODE_TOKENS.value,
      "decode_impls": impls,
      "step_parts": parts, "rows": rows, "environment": common.environment()})
  common.print_table(rows, columns)


if __name__ == "__main__":
  app.run(main)
