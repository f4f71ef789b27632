"""Mamba-2 LM presets: the released sizes (state-spaces/mamba2-*) and a tiny one for tests.

All released sizes use N = 128, P = 64, expand 2, G = 1, K = 4, chunk 256 and the GPT-NeoX
vocabulary of 50,277 tokens padded to a multiple of 16 (50,288 embedding rows: the released
configs say `"vocab_size": 50277, "pad_vocab_size_multiple": 16`).
Video-model presets live in models/video_presets.py.
"""

from __future__ import annotations

from ma2mba_jax.models.mamba2 import Mamba2Config

GPT_NEOX_VOCAB = 50277


def _released(d_model: int, n_layers: int) -> Mamba2Config:
  return Mamba2Config(d_model=d_model, n_layers=n_layers, vocab_size=GPT_NEOX_VOCAB,
                      pad_vocab_to_multiple=16, d_state=128, head_dim=64, expand=2,
                      n_groups=1, d_conv=4, chunk_len=256)


MAMBA2_PRESETS: dict[str, Mamba2Config] = {
    "130m": _released(768, 24),
    "370m": _released(1024, 48),
    "780m": _released(1536, 48),
    "1.3b": _released(2048, 48),
    "2.7b": _released(2560, 64),
    # For tests and demos on CPU: chunk 16 so that short sequences span several SSD chunks.
    "tiny": Mamba2Config(d_model=64, n_layers=2, vocab_size=250, pad_vocab_to_multiple=16,
                         d_state=16, head_dim=16, expand=2, n_groups=1, d_conv=4,
                         chunk_len=16),
}


def mamba2_config(name: str, **overrides) -> Mamba2Config:
  """The preset `name` ("130m", "370m", "780m", "1.3b", "2.7b", "tiny"), with overrides.

  e.g. `mamba2_config("2.7b", compute_dtype="bfloat16", ssd_impl="pallas")`.
  """
  if name not in MAMBA2_PRESETS:
    raise ValueError(f"unknown Mamba-2 preset {name!r}; valid presets: "
                     f"{', '.join(MAMBA2_PRESETS)}")
  return MAMBA2_PRESETS[name].replace(**overrides) if overrides else MAMBA2_PRESETS[name]
