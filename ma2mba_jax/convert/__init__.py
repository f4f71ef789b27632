"""Pretrained weights from local files into ma2mba_jax models, and model export/restore.

  load_mamba2(path)        HF-format or state-spaces Mamba-2 directory -> Mamba2LM
  load_clip_vision(path)   HF-format CLIP directory -> VisionEncoder
  python -m ma2mba_jax.convert --src DIR --out DIR   writes an Orbax export training starts from
"""

from ma2mba_jax.convert.clip import load_clip_vision, load_clip_vision_into
from ma2mba_jax.convert.mamba2 import load_mamba2

__all__ = ["load_mamba2", "load_clip_vision", "load_clip_vision_into"]
