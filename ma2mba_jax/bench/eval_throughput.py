"""Evaluation throughput: questions answered per second on the synthetic Video-MME-layout set
(data/synthetic.py), a random model, each way of batching one video's questions, and
whether they give the same answers and scores.

  python -m ma2mba_jax.bench.eval_throughput --synthetic_dir=/tmp/synth_eval     # tiny, CPU

Ways (infer/answering.py's ModelAnswerer):
  per_question   every question asked, scored and answered on its own (batch=False);
  decode_batch   the answers of a video's questions decoded as one batch, the questions
                 read and scored one by one (batch_text=False: evaluation before issue 19);
  all_batched    the questions also read together (Streamer.ask_many), every option of
                 every question scored in a few calls (Streamer.token_logprobs_rows), the
                 system turn read once for all videos (Streamer reuse_system_turn), the
                 frames decoded in a background thread, the next video's during the
                 current one's questions (Streamer decode_ahead), a video's last
                 frames read in power-of-two steps (Streamer rest_steps; decode_batch and
                 per_question read them one frame a step, as before), and on a GPU in
                 bf16 the encoder's attention by cuDNN (Streamer vision_attention; the
                 other two use XLA's, as before), a question's last tokens read in
                 sequence-mode power-of-two steps (Streamer text_rest; the other two read
                 them one recurrent step a token), and the Sampler's default step ('auto':
                 the fused step on a GPU; the other two: 'unrolled');
  all_batched_inline_decode  all_batched with the frames decoded on the model's thread;
  all_batched_xla_attention  with XLA's attention in the encoder (as decode_batch);
  all_batched_unrolled  with the unrolled decode step (as decode_batch).
  all_batched_fused  all_batched with the fused decode step (Sampler step_impl="fused":
                 models/decode.fused_decode_step, one kernel for each layer's middle);
                 all_batched_fused_gemv: step_impl="fused_gemv" (three kernels a layer).
Each way runs the whole set 1 + --timed_runs times (the first compiles; the timed runs take
turns between the ways) with the methods likelihood and generate; the fastest timed run
counts (the CPU is shared). Columns:
questions/s, x (speed-up over decode_batch), same choices (likelihood and generate choices
and generated texts equal decode_batch's), questions that differ (in either), same accuracy
(the accuracy table equals decode_batch's), max |d log p| (largest difference of an option's
summed log-probability from decode_batch's).
Flag names differ from evaluate's (imported here); --param_dtype=bfloat16 (evaluate's flag)
stores the random model's matrices in bf16.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from ma2mba_jax import evaluate
from ma2mba_jax.bench import common
from ma2mba_jax.data import synthetic
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.infer import model_flags
from ma2mba_jax.infer.answering import ModelAnswerer, make_sampler
from ma2mba_jax.infer.checkpoint import cast_matrices, inference_ssd_impl
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config

# way -> (ModelAnswerer options, Streamer options, the Sampler's step_impl).
# The Streamer before issue 19.
_OLD = dict(reuse_system_turn=False, decode_ahead=False, rest_steps="single",
            text_rest="single", vision_attention=None)
_BATCHED = dict(batch=True, batch_text=True)
WAYS = {"per_question": (dict(batch=False), _OLD, "unrolled"),
        "decode_batch": (dict(batch=True, batch_text=False), _OLD, "unrolled"),
        "all_batched": (_BATCHED, {}, "auto"),
        "all_batched_inline_decode": (_BATCHED, dict(decode_ahead=False), "auto"),
        "all_batched_xla_attention": (_BATCHED, dict(vision_attention=None), "auto"),
        "all_batched_unrolled": (_BATCHED, {}, "unrolled"),
        "all_batched_fused": (_BATCHED, {}, "fused"),
        "all_batched_fused_gemv": (_BATCHED, {}, "fused_gemv")}
METHODS = ("likelihood", "generate")

_PRESET = flags.DEFINE_string("model_preset", "tiny", "Video-Ma2mba preset.")
_DATA = flags.DEFINE_string("synthetic_dir", None, "Synthetic dataset folder (written when "
                            "missing).", required=True)
_EVAL_VIDEOS = flags.DEFINE_integer("eval_videos", 2, "Eval videos per duration class when "
                                    "the set is written (4 questions each).")
_TARGET = flags.DEFINE_enum("bench_target", "text", ["text", "letter"], "Likelihood target.")
_MAX_NEW = flags.DEFINE_integer("answer_tokens", 8, "Longest generated answer.")
_FRAMES_PER_STEP = flags.DEFINE_integer("step_frames", 8, "Frames per prefill step.")
_COMPUTE_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                                   "Matmul / SSD input dtype.")
_TIMED = flags.DEFINE_integer("timed_runs", 3, "Timed runs of the whole set per way.")
_JSON = flags.DEFINE_string("json_out", None, "Write the results here.")
_WAYS = flags.DEFINE_list("ways", list(WAYS), "Ways to run (decode_batch, the reference, "
                          "always runs).")


def main(argv):
  del argv
  data = _DATA.value
  if not os.path.isfile(os.path.join(data, "manifest.json")):
    synthetic.generate(data, seed=0, size="tiny", eval_videos=_EVAL_VIDEOS.value)
  tokenizer = load_tokenizer(os.path.join(data, "tokenizer.json"), add_missing=True)
  # The SSD backend evaluate would run (--ssd_impl, else pallas on a GPU).
  config = video_config(_PRESET.value, llm_vocab_size=vocab_size(tokenizer),
                        compute_dtype=_COMPUTE_DTYPE.value,
                        ssd_impl=inference_ssd_impl("auto", model_flags.SSD_IMPL.value))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VideoMa2mba(config, rngs=nnx.Rngs(0))))
  param_dtype = jnp.dtype(model_flags.PARAM_DTYPE.value or "float32")
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(cast_matrices(
      VideoMa2mba(config, rngs=nnx.Rngs(0)), param_dtype)))())
  items = evaluate.load_items("synthetic", data)
  rows, records, tables = [], {}, {}
  unknown = set(_WAYS.value) - set(WAYS)
  if unknown:
    raise app.UsageError(f"--ways: unknown {sorted(unknown)}; expected some of {list(WAYS)}")
  answerers = {}
  for way, (kwargs, streamer_kwargs, step) in WAYS.items():
    if way not in _WAYS.value and way != "decode_batch":
      continue
    streamer = Streamer(model, tokenizer, frames_per_step=_FRAMES_PER_STEP.value,
                        **streamer_kwargs)
    sampler = make_sampler(model, streamer, step_impl=step)
    answerers[way] = ModelAnswerer(streamer, sampler, target=_TARGET.value,
                                   mc_max_new_tokens=_MAX_NEW.value, **kwargs)
  # The first run of each way compiles; the timed runs then take turns between the ways, so
  # that a change in the machine's load (a shared CPU) reaches every way alike.
  seconds: dict[str, list[float]] = {way: [] for way in answerers}
  for _ in range(1 + _TIMED.value):
    for way, answerer in answerers.items():
      start = time.perf_counter()
      report = evaluate.evaluate_items("synthetic", data, items, answerer=answerer,
                                       methods=METHODS)
      seconds[way].append(time.perf_counter() - start)
      records[way], tables[way] = report["records"], report["rows"]
  for way, times in seconds.items():
    print(f"{way}: " + " ".join(f"{t:.3f}" for t in times[1:]))
    rows.append({"way": way, "questions": len(items), "first run s": times[0],
                 "timed run s": min(times[1:]), "questions/s": len(items) / min(times[1:])})
  base = records["decode_batch"]
  base_rate = next(r["questions/s"] for r in rows if r["way"] == "decode_batch")
  for row in rows:
    mine = records[row["way"]]
    row["x"] = row["questions/s"] / base_rate
    differ = sum(a["likelihood"]["choice"] != b["likelihood"]["choice"]
                 or a["generate"] != b["generate"] for a, b in zip(mine, base, strict=True))
    row["same choices"] = not differ
    row["questions that differ"] = differ
    row["same accuracy"] = tables[row["way"]] == tables["decode_batch"]
    row["max |d log p|"] = max(
        abs(a["likelihood"]["scores"][k]["sum"] - b["likelihood"]["scores"][k]["sum"])
        for a, b in zip(mine, base, strict=True) for k in b["likelihood"]["scores"])
  print(f"\n{_PRESET.value}, {len(items)} questions, target {_TARGET.value}, "
        f"{common.environment()['device']}")
  common.print_table(rows, list(rows[0]))
  common.write_json(_JSON.value, {"bench": "eval_throughput", "preset": _PRESET.value,
                                  "ssd_impl": config.ssd_impl,
                                  "rows": rows, "environment": common.environment()})


if __name__ == "__main__":
  app.run(main)
