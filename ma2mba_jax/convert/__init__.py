"""Pretrained weights from local files into ma2mba_jax models, and model export/restore.

  load_mamba2(path)        HF-format or state-spaces Mamba-2 directory -> Mamba2LM
  load_vision(path)        HF-format CLIP or SigLIP vision directory -> VisionEncoder
                           (load_clip_vision is the same function)
  python -m ma2mba_jax.convert --src DIR --out DIR   writes an Orbax export training starts from
  python -m ma2mba_jax.convert --export-hf RUN --out DIR   writes HF safetensors (export_hf.py)

The trainer's `config.model.vision_init` / `config.model.llm_init` load through
`pretrained.py`.
"""

from ma2mba_jax.convert.clip import (load_clip_vision, load_clip_vision_into, load_vision,
                                     load_vision_into)
from ma2mba_jax.convert.mamba2 import load_mamba2

__all__ = ["load_mamba2", "load_vision", "load_vision_into", "load_clip_vision",
           "load_clip_vision_into"]
