"""Video-Ma²mba presets: the paper's three sizes and a tiny one for tests.

  0.7b   CLIP ViT-L/14-336 + Mamba-2 370M
  1.8b   CLIP ViT-L/14-336 + Mamba-2 1.3B
  3.1b   CLIP ViT-L/14-336 + Mamba-2 2.7B
  tiny   tiny ViT (32 px, 4 x 4 patches -> 2 x 2 = 4 tokens per frame) + tiny Mamba-2

With tied embeddings the parameter counts are 0.674B, 1.654B and 3.015B; the paper's
0.7B / 1.8B / 3.1B are what one gets counting the LM head apart from the embedding, as a
checkpoint's state dict lists it (0.725B, 1.757B, 3.144B). tests/models/test_video_lm.py
checks both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ma2mba_jax.models.video_lm import VideoConfig

VIDEO_PRESETS: dict[str, VideoConfig] = {
    "0.7b": VideoConfig(name="0.7b", vision="clip-l-336", llm="370m"),
    "1.8b": VideoConfig(name="1.8b", vision="clip-l-336", llm="1.3b"),
    "3.1b": VideoConfig(name="3.1b", vision="clip-l-336", llm="2.7b"),
    "tiny": VideoConfig(name="tiny", vision="tiny", llm="tiny", frames_per_microbatch=2),
}


def video_config(name: str, **overrides: Any) -> VideoConfig:
  """The preset `name` with fields replaced, e.g.
  `video_config("3.1b", compute_dtype="bfloat16", frames_per_microbatch=32)`."""
  if name not in VIDEO_PRESETS:
    raise ValueError(f"unknown Video-Ma2mba preset {name!r}; valid presets: "
                     f"{', '.join(VIDEO_PRESETS)}")
  return dataclasses.replace(VIDEO_PRESETS[name], **overrides)
