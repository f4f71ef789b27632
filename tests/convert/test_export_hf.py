"""`python -m ma2mba_jax.convert --export-hf`: a trained tiny Video-Ma²mba written as HF
files (Mamba2ForCausalLM, CLIPVisionModel, projector, tokenizer) reads back through our
own HF loaders with identical parameters and identical f32 logits; with torch and
transformers installed, transformers' logits and features match ours within 1e-4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.convert.clip import load_vision
from ma2mba_jax.convert.export_hf import export_hf, load_hf_export
from ma2mba_jax.convert.io import save_model
from ma2mba_jax.convert.mamba2 import load_mamba2
from ma2mba_jax.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a red circle moves left", "a blue square turns", "the green triangle grows"] * 20


def _batch(model, seed=0):
  """tokens, vision_index [1, T] and frames [1, 2, S, S, 3] with both frames' tokens."""
  rng = np.random.default_rng(seed)
  k, s = model.config.tokens_per_frame, model.config.image_size
  t = 24
  vision_index = np.full((1, t), -1, np.int32)
  vision_index[0, 2:2 + 2 * k] = np.arange(2 * k)
  tokens = rng.integers(5, model.llm.config.vocab_size, (1, t)).astype(np.int32)
  frames = rng.integers(0, 256, (1, 2, s, s, 3), dtype=np.uint8)
  return jnp.asarray(tokens), jnp.asarray(vision_index), jnp.asarray(frames)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(trained-like model, workdir, HF export dir), written through the CLI."""
  root = tmp_path_factory.mktemp("export")
  tokenizer = train_tokenizer(TEXTS, vocab_size=300)
  cfg = video_config("tiny", llm_vocab_size=vocab_size(tokenizer), ssd_impl="xla")
  model = VideoMa2mba(cfg, rngs=nnx.Rngs(3))
  # Non-trivial values everywhere (norm gains and biases start at 1 / 0).
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  workdir = root / "work"
  save_model(model, workdir / "model", tokenizer=tokenizer)
  out = root / "hf"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "ma2mba_jax.convert", "--export-hf",
                           str(workdir), "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Mamba2ForCausalLM" in result.stdout and "CLIPVisionModel" in result.stdout
  with pytest.raises(FileExistsError, match="--overwrite"):
    export_hf(str(workdir), str(out))
  return model, workdir, out, tokenizer


def test_layout_of_the_export(exported):
  _, _, out, tokenizer = exported
  for name in ("ma2mba_export.json", "llm/config.json", "llm/model.safetensors",
               "llm/tokenizer.json", "llm/tokenizer_config.json", "vision/config.json",
               "vision/model.safetensors", "vision/preprocessor_config.json",
               "projector/config.json", "projector/model.safetensors"):
    assert (out / name).is_file(), name
  llm = json.loads((out / "llm/config.json").read_text())
  assert llm["architectures"] == ["Mamba2ForCausalLM"] and llm["tie_word_embeddings"]
  assert llm["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
  vision = json.loads((out / "vision/config.json").read_text())
  assert vision["model_type"] == "clip_vision_model" and vision["hidden_act"] == "quick_gelu"
  from safetensors import safe_open
  with safe_open(str(out / "llm/model.safetensors"), "np") as f:
    names = set(f.keys())
  assert "backbone.embeddings.weight" in names and "lm_head.weight" not in names  # tied
  with safe_open(str(out / "vision/model.safetensors"), "np") as f:
    assert all(n.startswith("vision_model.") for n in f.keys())
  saved = load_tokenizer(str(out / "llm/tokenizer.json"))
  assert saved.get_vocab(with_added_tokens=True) == tokenizer.get_vocab(with_added_tokens=True)


def test_reimport_gives_identical_parameters_and_logits(exported):
  model, _, out, _ = exported
  back = load_hf_export(str(out))
  assert isinstance(back, VideoMa2mba) and back.config == model.config
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = nnx.to_pure_dict(nnx.state(back, nnx.Param))
  assert jax.tree.structure(want) == jax.tree.structure(got)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               want, got)
  tokens, vision_index, frames = _batch(model)
  np.testing.assert_array_equal(np.asarray(back(tokens, vision_index, frames)),
                                np.asarray(model(tokens, vision_index, frames)))
  # Each part alone, through the loaders a user of the HF files would use.
  lm = load_mamba2(str(out / "llm"), ssd_impl="xla")
  np.testing.assert_array_equal(np.asarray(lm(tokens)), np.asarray(model.llm(tokens)))
  encoder = load_vision(str(out / "vision"))
  images = frames[0]
  np.testing.assert_array_equal(np.asarray(encoder(images)), np.asarray(model.vision(images)))


def test_transformers_reads_the_export(exported):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, _, out, _ = exported
  tokens, _, frames = _batch(model, seed=1)
  lm = transformers.Mamba2ForCausalLM.from_pretrained(str(out / "llm"),
                                                      torch_dtype=torch.float32).eval()
  with torch.no_grad():
    ref = lm(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
  ours = np.asarray(model.llm(tokens))
  np.testing.assert_allclose(ref, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
  vision = transformers.CLIPVisionModel.from_pretrained(str(out / "vision")).float().eval()
  cfg = model.vision.config
  pixels = (np.asarray(frames[0]) / 255.0 - np.array(cfg.image_mean)) / np.array(cfg.image_std)
  with torch.no_grad():
    hidden = vision(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2),
                                              dtype=torch.float32),
                    output_hidden_states=True).hidden_states[cfg.feature_layer].numpy()
  ours = np.asarray(model.vision(frames[0]))
  np.testing.assert_allclose(hidden[:, 1:], ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
  tok = transformers.AutoTokenizer.from_pretrained(str(out / "llm"))
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert text == ("<|system|>You are a helpful assistant.<|endoftext|><|user|>hi"
                  "<|endoftext|><|assistant|>")
