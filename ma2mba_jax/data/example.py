"""One sample -> one model example: frames decoded, text tokenised, fitted to the budget.

Fitting a sample into `max_tokens` tokens and `max_frames` frames (documented policy):
  1. A span shown as one block (stage 1 images and captions, stage 3's whole video before
     the first question) is sampled at `fps`; with more frames than fit, frames are dropped
     evenly across the video (kept frames stay on the 1/fps grid) down to
     min(max_frames, frames whose tokens fit beside the first exchange's text).
  2. Then, while the sample is still too long, whole exchanges are cut off its end
     (stage 2's trailing clips with their captions, stage 3's trailing QA pairs). The
     example reports how many were cut (`num_dropped`); the batcher counts and logs them.
  3. A sample whose first exchange cannot fit at all raises DataError naming the record
     (or, with skip_bad, is skipped and counted): raise max_tokens or lower fps.

Axis legend: T tokens, F frames, S image side.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tokenizers

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.formats import Exchange, Sample
from ma2mba_jax.data.template import ChatTurn, render
from ma2mba_jax.data.video import Video, frame_times, load_image


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What decoding and tokenising need to know (a slice of the data config)."""
  fps: float
  image_size: int
  tokens_per_frame: int
  max_frames: int
  max_tokens: int
  decode_threads: int = 1


def _context(sample: Sample) -> str:
  return f"{sample.source}: record {sample.record} (id {sample.id})"


def _turns(exchanges: tuple[Exchange, ...], counts: list[int]) -> list[ChatTurn]:
  return [ChatTurn(n, ex.user, ex.assistant) for ex, n in zip(exchanges, counts)]


def _frame_budget(sample: Sample, tokenizer, spec: ExampleSpec) -> int:
  """Most frames a single-block sample can show beside its first exchange's text."""
  text_only = render(_turns(sample.exchanges[:1], [0]), tokenizer=tokenizer,
                     tokens_per_frame=spec.tokens_per_frame)
  return min(spec.max_frames, (spec.max_tokens - text_only.turn_ends[0]) // spec.tokens_per_frame)


def build_example(sample: Sample, *, tokenizer: tokenizers.Tokenizer,
                  spec: ExampleSpec) -> dict:
  """Decodes and tokenises `sample` within the budget of `spec`.

  Returns a dict: tokens int32 [T], loss_mask bool [T], vision_index int32 [T],
  frames uint8 [F, S, S, 3], id (str), num_dropped (int: exchanges cut off the end).
  Raises DataError naming the annotation record and the media file.
  """
  try:
    return _build(sample, tokenizer, spec)
  except DataError as e:
    raise DataError(f"{_context(sample)}: {e}") from e


def _build(sample: Sample, tokenizer, spec: ExampleSpec) -> dict:
  spans = [ex.span for ex in sample.exchanges]
  single_block = spans[0] is not None and all(span is None for span in spans[1:])
  budget = _frame_budget(sample, tokenizer, spec) if single_block else spec.max_frames
  if budget < 1:
    raise DataError(f"not even one frame fits in max_tokens={spec.max_tokens} beside the "
                    "first exchange's text; raise max_tokens")
  video = Video(sample.path, threads=spec.decode_threads) if sample.media == "video" else None
  try:
    times: list[np.ndarray] = []  # per exchange: float64 [F_i]
    for span in spans:
      if span is None:
        times.append(np.zeros((0,)))
      elif video is None:  # an image: one frame
        times.append(np.zeros((1,)))
      else:
        times.append(frame_times(
            video.duration, fps=spec.fps, start=span[0], end=span[1],
            max_frames=budget if single_block else None, path=sample.path))
    rendered = render(_turns(sample.exchanges, [t.size for t in times]), tokenizer=tokenizer,
                      tokens_per_frame=spec.tokens_per_frame)
    fits = [end <= spec.max_tokens and frames <= spec.max_frames
            for end, frames in zip(rendered.turn_ends, rendered.turn_frames)]
    keep = fits.index(False) if False in fits else len(fits)
    if keep == 0:
      raise DataError(
          f"its first exchange needs {rendered.turn_ends[0]} tokens and "
          f"{rendered.turn_frames[0]} frames, over max_tokens={spec.max_tokens} or "
          f"max_frames={spec.max_frames}; raise them or lower fps")
    rendered = rendered.first_turns(keep)
    wanted = np.concatenate(times[:keep])
    if video is not None:
      frames = video.frames_at(wanted, spec.image_size)
    elif wanted.size:
      frames = load_image(sample.path, spec.image_size)[None]
    else:
      frames = np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8)
  finally:
    if video is not None:
      video.close()
  return {
      "tokens": rendered.tokens,
      "loss_mask": rendered.loss_mask,
      "vision_index": rendered.vision_index,
      "frames": frames,
      "id": sample.id,
      "num_dropped": len(spans) - keep,
  }
