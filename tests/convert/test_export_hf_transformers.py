"""Round trips with transformers (needs torch and transformers: skipped in CI, run on the
device image, see docs/pretrained.md "Hugging Face out"):

  - a random tiny Mamba2LM (f32), exported with `python -m ma2mba_jax.convert --export-hf`,
    gives the same logits in transformers' `Mamba2ForCausalLM` as in ours, at lengths
    below, at and past the SSD chunk (odd ones included), tied and untied heads; its
    tokenizer loads in `AutoTokenizer` and encodes as ours;
  - transformers' own random `Mamba2ForCausalLM`, saved with `save_pretrained`, imported
    by `load_mamba2` and by `python -m ma2mba_jax.convert --src`, gives transformers'
    logits.

The Video-Ma²mba export (LM, vision tower, tokenizer's chat template) is checked against
transformers in test_export_hf.py::test_transformers_reads_the_export.

Verified on the device image (torch 2.11.0, transformers 5.17.0, jax 0.11.2, all on CPU),
2026-11-26: these 5 tests and test_export_hf.py::test_transformers_reads_the_export pass;
command and numbers in docs/pretrained.md ("Verified on the device image").
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ma2mba_jax.convert.io import restore_model  # noqa: E402
from tests.convert import hf_transformers_check as check  # noqa: E402

# max|ours - transformers| / max|transformers|. Sweep (`python -m
# tests.convert.hf_transformers_check --seeds 20`, device image CPU, 2026-11-26), worst over
# 20 seeds x lengths 7/16/41/53: export tied 1.12e-6, untied 0.91e-6; import tied 1.08e-6,
# untied 0.99e-6 (medians 0.72e-6 to 0.76e-6). 1e-5 keeps a 9x margin; the issue asks 1e-4.
TOL = 1e-5


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_gives_transformers_our_logits(tmp_path, tie):
  errors = check.export_errors(0, tie, tmp_path, "cli" if tie else "function")
  assert max(errors.values()) < TOL, errors
  if tie:
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf" / "llm"))
    ours = check.train_tokenizer(check.TEXTS, vocab_size=300)
    text = "a red circle moves left, the green triangle grows"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_import_of_a_transformers_save(tmp_path, tie):
  errors = check.import_errors(1, tie, tmp_path)
  assert max(errors.values()) < TOL, errors


def test_convert_cli_imports_a_transformers_save(tmp_path):
  hf = check.transformers_lm(2, tie=False)
  hf.save_pretrained(str(tmp_path / "saved"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "ma2mba_jax.convert", "--src",
                           str(tmp_path / "saved"), "--out", str(tmp_path / "orbax"),
                           "--ssd_impl", "xla"], capture_output=True, text=True, env=env,
                          cwd=check.REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  ours = restore_model(str(tmp_path / "orbax"))
  ids = check.random_ids(5, hf.config.vocab_size, 41)
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.float().numpy()
  got = np.asarray(check._forward(ours, jax.numpy.asarray(ids, jax.numpy.int32)))  # noqa: SLF001
  assert check.relative_error(got, ref) < TOL
