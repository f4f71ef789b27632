"""Answer questions about a video: the video is streamed into the model's state, then each
question is answered by recurrent decoding, follow-ups continuing the same state.

  python -m ma2mba_jax.generate --checkpoint=runs/demo/stage3 \
      --video=runs/demo/data/eval/videos/synth_001.mp4 \
      --question="What colour is the triangle?" --followup="Which way does it move?"

Flags shared with evaluate (--checkpoint, --tokenizer, --fps, --max_frames,
--frames_per_step, --compute_dtype, --param_dtype, --ssd_impl): infer/model_flags.py.
--checkpoint is a trainer workdir (its model/ export and the tokenizer its config.json names)
or a model export folder (then --tokenizer, unless the parent workdir names it). Greedy by
default; --temperature > 0 samples (with --top_p, --top_k, --min_p, --seed);
--repetition_penalty applies to both. Progress goes to stderr, the answers to stdout, each
streamed as it is decoded (--decode_impl=device: the on-device loop, --block_tokens tokens
per dispatch; host: one dispatch per token, the reference).
"""

from __future__ import annotations

import sys

from absl import app, flags

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.infer import answering, model_flags
from ma2mba_jax.infer.sample import SamplingParams
from ma2mba_jax.infer.stream import Streamer

flags.adopt_module_key_flags(model_flags)  # --help lists the shared flags too
flags.mark_flag_as_required("checkpoint")
_VIDEO = flags.DEFINE_string("video", None, "The video file.", required=True)
_QUESTION = flags.DEFINE_string("question", None, "The first question.", required=True)
_FOLLOWUP = flags.DEFINE_multi_string("followup", [], "Follow-up questions, in order "
                                      "(repeat the flag); each continues the running state.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer, in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep tokens at least this fraction as likely as "
                            "the most likely one (0: off).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "> 1 makes tokens already "
                                         "generated less likely (1: off).")
_DECODE_IMPL = flags.DEFINE_enum("decode_impl", "device", ["device", "host"], "Decoding loop.")
_BLOCK_TOKENS = flags.DEFINE_integer("block_tokens", 8, "Tokens per dispatch of the device "
                                     "loop (each block is printed as it comes).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NO_REPEAT_STOP = flags.DEFINE_bool("no_repeat_stop", False, "Do not stop when 5 generated "
                                    "tokens repeat earlier generated text (the paper's rule).")


def main(argv):
  del argv
  try:
    run()
  except (DataError, FileNotFoundError) as e:  # bad input: the message names it
    sys.exit(f"generate: error: {e}")


def run() -> None:
  sampling = SamplingParams(max_new_tokens=_MAX_NEW_TOKENS.value,
                            temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                            top_k=_TOP_K.value, min_p=_MIN_P.value,
                            repetition_penalty=_REPETITION_PENALTY.value, seed=_SEED.value,
                            stop_on_repeat=not _NO_REPEAT_STOP.value)
  model, tokenizer = model_flags.load_model()
  streamer = Streamer(model, tokenizer, frames_per_step=model_flags.FRAMES_PER_STEP.value)
  sampler = answering.make_sampler(model, streamer, decode_impl=_DECODE_IMPL.value,
                                   block_tokens=_BLOCK_TOKENS.value)
  # Each answer is streamed to stdout as it is decoded (Q: ..., A: ..., as before).
  answering.chat(streamer, sampler, _VIDEO.value, [_QUESTION.value, *_FOLLOWUP.value],
                 sampling=sampling, fps=model_flags.FPS.value,
                 max_frames=model_flags.MAX_FRAMES.value,
                 progress=answering.progress_printer(f"reading {_VIDEO.value}"), out=sys.stdout)


if __name__ == "__main__":
  app.run(main)
