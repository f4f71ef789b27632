"""Small random Hugging Face checkpoints and a GPT-NeoX-style tokenizer, written by the
tests themselves (torch and transformers are not installed in CI): an HF
`Mamba2ForCausalLM` directory, a `CLIPVisionModel` directory, and a byte-level BPE
tokenizer that, like GPT-NeoX's, has `<|endoftext|>` but none of the chat tokens."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.data.tokenizer import ENDOFTEXT
from ma2mba_jax.models.mamba2 import Mamba2Config
from ma2mba_jax.models.vision import VisionConfig


def random_mamba2_tensors(config: Mamba2Config, seed: int) -> dict[str, np.ndarray]:
  """HF Mamba2ForCausalLM tensors of `config` (float32, random, sane ranges)."""
  c = config
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  near_one = lambda n: (1.0 + 0.1 * normal(n)).astype(np.float32)
  t = {"backbone.embeddings.weight": 0.5 * normal(c.padded_vocab_size, c.d_model),
       "backbone.norm_f.weight": near_one(c.d_model)}
  for i in range(c.n_layers):
    p = f"backbone.layers.{i}."
    t.update({
        p + "norm.weight": near_one(c.d_model),
        p + "mixer.in_proj.weight": normal(c.d_in_proj, c.d_model) / math.sqrt(c.d_model),
        p + "mixer.conv1d.weight": 0.5 * normal(c.conv_dim, 1, c.d_conv),
        p + "mixer.conv1d.bias": 0.1 * normal(c.conv_dim),
        p + "mixer.dt_bias": rng.uniform(-3.0, -1.0, c.n_heads).astype(np.float32),
        p + "mixer.A_log": np.log(rng.uniform(1.0, 4.0, c.n_heads)).astype(np.float32),
        p + "mixer.D": normal(c.n_heads),
        p + "mixer.norm.weight": near_one(c.d_inner),
        p + "mixer.out_proj.weight": normal(c.d_model, c.d_inner) / math.sqrt(c.d_inner),
    })
  if not c.tie_embeddings:
    t["lm_head.weight"] = 0.5 * normal(c.padded_vocab_size, c.d_model)
  return t


def write_hf_mamba2(path: str, config: Mamba2Config, seed: int,
                    tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """A Mamba2ForCausalLM directory (config.json + model.safetensors) of `config`; returns
  the tensors written."""
  os.makedirs(path, exist_ok=True)
  tensors = random_mamba2_tensors(config, seed) if tensors is None else tensors
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(mamba2_ckpt.hf_config(config, eos_token_id=0, pad_token_id=0), f)
  return tensors


def random_vision_tensors(cfg: VisionConfig, seed: int) -> dict[str, np.ndarray]:
  """CLIP / SigLIP vision tensors (names after `vision_model.`) of `cfg`, random."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in vision_ckpt._expected_shapes(cfg).items():
    if name.endswith(("norm1.weight", "norm2.weight", "layrnorm.weight", "layernorm.weight")):
      out[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
  return out


def write_hf_vision(path: str, cfg: VisionConfig, seed: int, *,
                    prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """A CLIPVisionModel (or SiglipVisionModel) directory of `cfg`; returns the tensors
  (names after the prefix)."""
  os.makedirs(path, exist_ok=True)
  tensors = random_vision_tensors(cfg, seed)
  save_file({prefix + k: v for k, v in tensors.items()},
            os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(vision_ckpt.hf_config_from_vision(cfg), f)
  return tensors


def _strings(node, out: list[str]) -> None:
  if isinstance(node, str):
    out.append(node)
  elif isinstance(node, dict):
    for value in node.values():
      _strings(value, out)
  elif isinstance(node, list):
    for value in node:
      _strings(value, out)


def neox_style_tokenizer(data_dir: str, out_path: str, vocab_size: int = 400) -> str:
  """A byte-level BPE tokenizer trained on the text of a synthetic set's annotations, with
  `<|endoftext|>` (id 0) as its only special token, as GPT-NeoX's; saved to out_path."""
  texts: list[str] = []
  for path in sorted(glob.glob(os.path.join(data_dir, "**", "*.json*"), recursive=True)):
    with open(path, encoding="utf-8") as f:
      raw = f.read()
    try:
      records = [json.loads(raw)]
    except json.JSONDecodeError:
      records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    _strings(records, texts)
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.save(out_path)
  return out_path
