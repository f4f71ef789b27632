"""The paper's recipe from pretrained weights, end to end on CPU: small random HF
checkpoints (a Mamba2ForCausalLM and a CLIPVisionModel of the tiny preset's shapes) and a
GPT-NeoX-style tokenizer without the chat tokens, then stages 1 to 3 through
`python -m ma2mba_jax.main` with model.vision_init, model.llm_init and
data.add_special_tokens, then `generate` and `evaluate` on the result. Stage 1 (lr_vision =
lr_llm = 0, as in the paper) must keep the loaded CLIP and Mamba-2 weights unchanged."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.data import synthetic
from ma2mba_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, vocab_size
from ma2mba_jax.models.video_presets import video_config
from tests.convert.hf_fixtures import neox_style_tokenizer, write_hf_mamba2, write_hf_vision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module, args, cwd):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (module, result.stdout[-2000:], result.stderr[-4000:])
  return result


def _stage(stage, workdir, data, tokenizer, cwd, extra=(), steps=2):
  """Stage `stage` of the demo config, shrunk to `steps` steps of 2 short rows."""
  return _run("ma2mba_jax.main", [
      f"--config={ROOT}/configs/stage{stage}.py:demo", f"--workdir={workdir}",
      f"--config.data.synthetic_dir={data}", f"--config.data.tokenizer={tokenizer}",
      "--config.data.add_special_tokens=True", "--config.data.max_tokens=96",
      "--config.data.max_frames=4", "--config.optim.global_batch=2",
      "--config.optim.micro_batch=2", "--config.remat.policy=none", f"--config.train.steps={steps}",
      "--config.train.log_every=1", "--config.eval.batches=0", *extra], cwd)


def test_stages_1_to_3_from_hf_checkpoints_then_generate_and_evaluate(tmp_path):
  data = str(tmp_path / "data")
  synthetic.generate(data, seed=0, size="tiny", frame_size=32)
  tokenizer = neox_style_tokenizer(data, str(tmp_path / "neox.json"))
  with pytest.raises(Exception, match="lacks the chat template"):
    load_tokenizer(tokenizer)  # GPT-NeoX-like: no chat tokens of its own
  full = load_tokenizer(tokenizer, add_missing=True)
  model_cfg = video_config("tiny", llm_vocab_size=vocab_size(full))
  clip_dir, llm_dir = str(tmp_path / "clip"), str(tmp_path / "mamba2")
  clip = write_hf_vision(clip_dir, model_cfg.vision_config, seed=5)
  llm = write_hf_mamba2(llm_dir, model_cfg.llm_config, seed=6)

  w1, w2, w3 = (str(tmp_path / f"stage{i}") for i in (1, 2, 3))
  out = _stage(1, w1, data, tokenizer, tmp_path, [
      f"--config.model.vision_init={clip_dir}", f"--config.model.llm_init={llm_dir}",
      "--config.optim.lr_vision=0", "--config.optim.lr_llm=0"])
  assert f"vision encoder from {clip_dir}" in out.stdout and f"LM from {llm_dir}" in out.stdout
  exported = model_io.restore_model(os.path.join(w1, "model"))
  got = {g: jax.tree.map(np.asarray, v) for g, v in
         model_io.nnx.to_pure_dict(model_io.nnx.state(exported, model_io.nnx.Param)).items()}
  # Frozen in stage 1: exactly the checkpoints' weights.
  want_vision = vision_ckpt.to_nnx_params(clip, model_cfg.vision_config)
  want_llm = mamba2_ckpt.tensors_to_params(llm, model_cfg.llm_config, "hf")
  jax.tree.map(np.testing.assert_array_equal, got["vision"], want_vision)
  jax.tree.map(np.testing.assert_array_equal, got["llm"], want_llm)
  # The tokenizer, special tokens appended, went with the export.
  saved = load_tokenizer(os.path.join(w1, "model", "tokenizer.json"))
  assert [saved.token_to_id(t) for t in SPECIAL_TOKENS] == \
      [full.token_to_id(t) for t in SPECIAL_TOKENS]

  # One step each, at the peak learning rate (no warmup), to keep the test short.
  for stage, workdir, previous in ((2, w2, w1), (3, w3, w2)):
    _stage(stage, workdir, data, tokenizer, tmp_path,
           [f"--config.init_from={previous}", "--config.optim.warmup_frac=0"], steps=1)
  final = model_io.restore_model(os.path.join(w3, "model"))
  final_llm = model_io.nnx.to_pure_dict(model_io.nnx.state(final.llm, model_io.nnx.Param))
  assert not np.array_equal(np.asarray(final_llm["embedding"]), want_llm["embedding"])

  video = os.path.join(data, "eval", "videos", sorted(os.listdir(
      os.path.join(data, "eval", "videos")))[0])
  gen = _run("ma2mba_jax.generate", [f"--checkpoint={w3}", f"--video={video}",
                                     "--question=What colour is the circle?",
                                     "--max_new_tokens=4", "--max_frames=4"], tmp_path)
  assert gen.stdout.startswith("Q: What colour is the circle?\nA:"), gen.stdout
  result_json = str(tmp_path / "eval.json")
  _run("ma2mba_jax.evaluate", [f"--checkpoint={w3}", "--benchmark=synthetic",
                               f"--annotations={data}", "--method=both", "--max_frames=4",
                               "--max_new_tokens=4", "--limit=2", f"--json={result_json}"], tmp_path)
  with open(result_json) as f:
    results = json.load(f)
  answered = json.dumps(results)
  assert "likelihood" in answered and "generate" in answered, answered[:2000]
