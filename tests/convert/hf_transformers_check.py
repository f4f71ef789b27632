"""Our Mamba-2 LM against transformers' `Mamba2ForCausalLM`, both directions, for the
tests in test_export_hf_transformers.py and a tolerance sweep over seeds:

    python -m tests.convert.hf_transformers_check --seeds 20 [--out results.json]

  export   a random tiny Mamba2LM (f32) -> `python -m ma2mba_jax.convert --export-hf` ->
           `Mamba2ForCausalLM.from_pretrained` -> logits compared with ours;
  import   transformers' own random `Mamba2ForCausalLM` -> `save_pretrained` ->
           `ma2mba_jax.convert.mamba2.load_mamba2` -> logits compared with transformers'.

The error reported is max |ours - transformers| / max |transformers|, over a batch of random
ids of each length (one shorter than, one equal to, and two longer than the SSD chunk).
Needs torch and transformers (the device image has both; CI has neither).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ma2mba_jax.convert.export_hf import export_hf
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.convert.io import save_model
from ma2mba_jax.convert.mamba2 import load_mamba2
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import mamba2_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a red circle moves left", "a blue square turns", "the green triangle grows"] * 20
CHUNK = 16  # the tiny preset's SSD chunk length
LENGTHS = (7, CHUNK, 41, 53)  # below, at, and past the chunk (odd lengths included)
BATCH = 2


def random_ids(seed: int, vocab: int, length: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (BATCH, length)).astype(np.int64)


def tiny_lm(seed: int, vocab: int, tie: bool) -> Mamba2LM:
  """The tiny preset in f32 with every parameter moved off its initial value (norm gains
  start at 1, D at 1), so that a swapped or transposed tensor shows in the logits."""
  cfg = mamba2_config("tiny", vocab_size=vocab, tie_embeddings=tie, ssd_impl="xla",
                      compute_dtype="float32", chunk_len=CHUNK)
  model = Mamba2LM(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


_forward = nnx.jit(lambda model, ids: model(ids))
HOW = ("cli", "function", "tensors")


def export(model: Mamba2LM, tokenizer, root: Path, how: str) -> Path:
  """Our model as an HF export under root/hf; returns the export dir. how: 'cli' (save_model,
  then `python -m ma2mba_jax.convert --export-hf`), 'function' (save_model, then
  `export_hf` in this process) or 'tensors' (the LM files written straight from the
  parameters by the functions export_hf uses, no Orbax save: the seed sweep)."""
  out = root / "hf"
  if how == "tensors":
    (out / "llm").mkdir(parents=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_file(mamba2_ckpt.params_to_tensors(params, model.config, "hf"),
              str(out / "llm" / "model.safetensors"), metadata={"format": "pt"})
    (out / "llm" / "config.json").write_text(json.dumps(mamba2_ckpt.hf_config(model.config)))
    return out
  save_model(model, root / "model", tokenizer=tokenizer)
  if how == "function":
    export_hf(str(root / "model"), str(out))
    return out
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "ma2mba_jax.convert", "--export-hf",
                           str(root / "model"), "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300)
  if result.returncode:
    raise RuntimeError(f"--export-hf failed:\n{result.stderr[-3000:]}")
  return out


def export_errors(seed: int, tie: bool, root: Path, how: str = "tensors"
                  ) -> dict[str, float]:
  """Export direction: {length: relative error} of transformers' logits on our export."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  tokenizer = train_tokenizer(TEXTS, vocab_size=300)
  vocab = vocab_size(tokenizer)
  model = tiny_lm(seed, vocab, tie)
  out = export(model, tokenizer, root, how)
  hf = transformers.Mamba2ForCausalLM.from_pretrained(str(out / "llm"),
                                                      dtype=torch.float32).eval()
  errors = {}
  for length in LENGTHS:
    ids = random_ids(seed * 100 + length, vocab, length)
    with torch.no_grad():
      ref = hf(torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(_forward(model, jax.numpy.asarray(ids, jax.numpy.int32)))
    errors[str(length)] = relative_error(ours, ref)
  return errors


def transformers_lm(seed: int, tie: bool, vocab: int = 272):
  """transformers' own random tiny Mamba2ForCausalLM (its init, then every parameter moved
  by a little noise so that norm gains and D are not all ones)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(seed)
  config = transformers.Mamba2Config(
      vocab_size=vocab, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16,
      num_heads=8, expand=2, n_groups=1, conv_kernel=4, chunk_size=CHUNK,
      tie_word_embeddings=tie, layer_norm_epsilon=1e-5)
  model = transformers.Mamba2ForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def import_errors(seed: int, tie: bool, root: Path) -> dict[str, float]:
  """Import direction: {length: relative error} of our logits on transformers' save."""
  import torch  # noqa: PLC0415
  hf = transformers_lm(seed, tie)
  hf.save_pretrained(str(root / "hf_saved"))
  ours = load_mamba2(str(root / "hf_saved"), ssd_impl="xla", compute_dtype="float32")
  errors = {}
  for length in LENGTHS:
    ids = random_ids(seed * 100 + length + 1, hf.config.vocab_size, length)
    with torch.no_grad():
      ref = hf(torch.tensor(ids)).logits.float().numpy()
    got = np.asarray(_forward(ours, jax.numpy.asarray(ids, jax.numpy.int32)))
    errors[str(length)] = relative_error(got, ref)
  return errors


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=20)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  results = {}
  for direction, fn in (("export", export_errors), ("import", import_errors)):
    for tie in (True, False):
      worst = []
      for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
          worst.append(max(fn(seed, tie, Path(tmp)).values()))
      key = f"{direction}/tied={tie}"
      results[key] = {"seeds": args.seeds, "max": max(worst), "median": float(np.median(worst))}
      print(f"{key}: max relative error over {args.seeds} seeds {max(worst):.2e} "
            f"(median {np.median(worst):.2e})", flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
