"""The flags both inference entry points (generate.py, evaluate.py) take, defined once: the
checkpoint, its tokenizer and dtypes, and how each video is read."""

from __future__ import annotations

from typing import Any

from absl import flags

from ma2mba_jax.infer import checkpoint
from ma2mba_jax.kernels.ssd.registry import IMPLS

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trainer workdir or model export folder.")
TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer.json (default: from the "
                                "checkpoint's config.json).")
FPS = flags.DEFINE_float("fps", 1.0, "Frames per second read from each video (every frame on "
                         "that grid).")
MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "At most this many frames per video, "
                                  "spread evenly (default: all).")
FRAMES_PER_STEP = flags.DEFINE_integer("frames_per_step", 64, "Frames encoded per step "
                                       "(device memory grows with this, not the video; "
                                       "the 3.1B model's step plan is 0.9 GB at 64).")
COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "", ["", "float32", "bfloat16"],
                                  "Override the checkpoint's compute dtype.")
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "", ["", "bfloat16"],
                                "Store weight matrices in bf16 (default: f32).")

SSD_IMPL = flags.DEFINE_enum(
    "ssd_impl", "", ["", *IMPLS], "The SSD backend of the video and question reads (default: "
    "the checkpoint's; its 'auto' is read as 'pallas' on a GPU, infer/checkpoint."
    "inference_ssd_impl). On an H100 with the 3.1B model the Pallas kernels run the frame "
    "step's LM 1.2-1.8% faster than jax-triton's ('triton', which training's 'auto' picks) "
    "and the answers after them decode 2.5-4.3% faster (406-412 against 393-400 tokens/s; "
    "BENCHMARKS.md, \"Prefill and decoding, session 16\").")


def load_model() -> tuple[Any, Any]:
  """(model, tokenizer) of --checkpoint with --tokenizer, --compute_dtype, --param_dtype,
  --ssd_impl."""
  return checkpoint.load(CHECKPOINT.value, tokenizer=TOKENIZER.value,
                         compute_dtype=COMPUTE_DTYPE.value, param_dtype=PARAM_DTYPE.value,
                         ssd_impl=SSD_IMPL.value)
