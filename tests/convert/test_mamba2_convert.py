"""Pretrained-weight conversion: tiny checkpoints built here in the HF and state-spaces
layouts load into Mamba2LM and give the logits of an independent float64 numpy forward
(written below from the raw tensors, sequential recurrence); bad checkpoints fail with
errors that name the tensor; the CLI writes an Orbax checkpoint that restores exactly.

Letters: B batch, T time, D model width, E inner width, H heads, P head dim, N state,
G groups, C conv channels, K conv kernel, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from ma2mba_jax.convert.io import decode_config, encode_config, restore_model, save_model
from ma2mba_jax.convert.mamba2 import CheckpointError, load_mamba2, read_config
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.testing import rel_err

REPO_ROOT = Path(__file__).resolve().parents[2]

# The tiny architecture of every checkpoint here: D 32, E 64, N 8, P 8 -> H 8, G 2 (so that
# B/C groups and the grouped gated norm are exercised), K 4, 2 layers, chunk 8.
D_MODEL, N_LAYERS, D_STATE, HEAD_DIM, N_GROUPS, D_CONV, CHUNK = 32, 2, 8, 8, 2, 4, 8
E = 2 * D_MODEL
H = E // HEAD_DIM
C = E + 2 * N_GROUPS * D_STATE
W = 2 * E + 2 * N_GROUPS * D_STATE + H
VOCAB, VOCAB_ROWS = 50, 64   # state-spaces pads 50 to a multiple of 16; HF stores 64 rows

EMBEDDING = {"hf": "backbone.embeddings.weight", "state-spaces": "backbone.embedding.weight"}

# Tiny models: skip LLVM's optimisation passes, compiling dominates (same XLA program).
_forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens),
                   static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


def logits_of(model, tokens):
  """Jitted logits [B, T, V]; models with equal configs share one compilation."""
  return _forward(*nnx.split(model), tokens)


# --------------------------------------------------------------------------- checkpoints


def random_tensors(layout: str, *, with_lm_head: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random raw tensors (float32) with the checkpoint names of `layout`."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  near_one = lambda n: (1.0 + 0.1 * normal(n)).astype(np.float32)
  tensors = {EMBEDDING[layout]: normal(VOCAB_ROWS, D_MODEL),
             "backbone.norm_f.weight": near_one(D_MODEL)}
  for i in range(N_LAYERS):
    p = f"backbone.layers.{i}."
    tensors.update({
        p + "norm.weight": near_one(D_MODEL),
        p + "mixer.in_proj.weight": normal(W, D_MODEL) / math.sqrt(D_MODEL),
        p + "mixer.conv1d.weight": 0.5 * normal(C, 1, D_CONV),
        p + "mixer.conv1d.bias": 0.1 * normal(C),
        p + "mixer.dt_bias": rng.uniform(-3.0, -1.0, H).astype(np.float32),
        p + "mixer.A_log": np.log(rng.uniform(1.0, 4.0, H)).astype(np.float32),
        p + "mixer.D": normal(H),
        p + "mixer.norm.weight": near_one(E),
        p + "mixer.out_proj.weight": normal(D_MODEL, E) / math.sqrt(E),
    })
  if with_lm_head:
    tensors["lm_head.weight"] = normal(VOCAB_ROWS, D_MODEL)
  return tensors


def hf_config(tied: bool) -> dict:
  return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
          "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "vocab_size": VOCAB_ROWS,
          "state_size": D_STATE, "head_dim": HEAD_DIM, "num_heads": H, "expand": 2,
          "n_groups": N_GROUPS, "conv_kernel": D_CONV, "chunk_size": CHUNK,
          "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True,
          "hidden_act": "silu", "rms_norm": True, "residual_in_fp32": True,
          "time_step_limit": [0.0, float("inf")], "tie_word_embeddings": tied,
          "torch_dtype": "float32"}


def state_spaces_config(tied: bool) -> dict:
  return {"d_model": D_MODEL, "d_intermediate": 0, "n_layer": N_LAYERS, "vocab_size": VOCAB,
          "ssm_cfg": {"layer": "Mamba2", "d_state": D_STATE, "headdim": HEAD_DIM,
                      "ngroups": N_GROUPS, "d_conv": D_CONV, "chunk_size": CHUNK},
          "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
          "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": tied}


def write_checkpoint(directory: Path, config: dict, tensors: dict[str, np.ndarray], *,
                     shards: int = 1) -> Path:
  """config.json plus model.safetensors (or `shards` files and an index)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  if shards == 1:
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
  names = sorted(tensors)
  weight_map = {}
  for k in range(shards):
    shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    part = {name: tensors[name] for name in names[k::shards]}
    save_file(part, str(directory / shard), metadata={"format": "pt"})
    weight_map.update({name: shard for name in part})
  (directory / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


# --------------------------------------------------------------------------- the oracle


def _rms(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def reference_logits(tensors: dict[str, np.ndarray], layout: str, tokens: np.ndarray,
                     tied: bool) -> np.ndarray:
  """Mamba-2 forward in float64 numpy, straight from the raw checkpoint tensors."""
  t = {name: np.asarray(v, np.float64) for name, v in tensors.items()}
  batch, seqlen = tokens.shape
  group_of_head = np.arange(H) // (H // N_GROUPS)
  h = t[EMBEDDING[layout]][tokens]                                  # [B, T, D]
  for i in range(N_LAYERS):
    p = f"backbone.layers.{i}."
    u = _rms(h, t[p + "norm.weight"])
    zxbcdt = u @ t[p + "mixer.in_proj.weight"].T                    # [B, T, W]
    z, xBC, dt = zxbcdt[..., :E], zxbcdt[..., E:E + C], zxbcdt[..., E + C:]
    weight = t[p + "mixer.conv1d.weight"][:, 0, :]                  # [C, K]
    padded = np.concatenate([np.zeros((batch, D_CONV - 1, C)), xBC], axis=1)
    conv = np.stack([np.sum(padded[:, s:s + D_CONV] * weight.T, axis=1)
                     for s in range(seqlen)], axis=1) + t[p + "mixer.conv1d.bias"]
    xBC = _silu(conv)
    x = xBC[..., :E].reshape(batch, seqlen, H, HEAD_DIM)
    Bm = xBC[..., E:E + N_GROUPS * D_STATE].reshape(batch, seqlen, N_GROUPS, D_STATE)
    Cm = xBC[..., E + N_GROUPS * D_STATE:].reshape(batch, seqlen, N_GROUPS, D_STATE)
    dt = np.log1p(np.exp(dt + t[p + "mixer.dt_bias"]))             # softplus, [B, T, H]
    A = -np.exp(t[p + "mixer.A_log"])                               # [H]
    state = np.zeros((batch, H, HEAD_DIM, D_STATE))
    y = np.zeros((batch, seqlen, H, HEAD_DIM))
    for s in range(seqlen):
      B_s, C_s = Bm[:, s, group_of_head], Cm[:, s, group_of_head]  # [B, H, N]
      state = (np.exp(dt[:, s] * A)[:, :, None, None] * state
               + (dt[:, s, :, None] * x[:, s])[..., None] * B_s[:, :, None, :])
      y[:, s] = (np.einsum("bhpn,bhn->bhp", state, C_s)
                 + t[p + "mixer.D"][:, None] * x[:, s])
    gated = y.reshape(batch, seqlen, E) * _silu(z)
    grouped = gated.reshape(batch, seqlen, N_GROUPS, E // N_GROUPS)
    normed = _rms(grouped, 1.0).reshape(batch, seqlen, E) * t[p + "mixer.norm.weight"]
    h = h + normed @ t[p + "mixer.out_proj.weight"].T
  h = _rms(h, t["backbone.norm_f.weight"])
  head = t[EMBEDDING[layout]] if tied else t["lm_head.weight"]
  return h @ head.T


def sample_tokens(seed: int = 1, seqlen: int = 13) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (2, seqlen)).astype(np.int32)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("shards,dtype", [(1, "float32"), (2, "bfloat16")])
def test_hf_layout_matches_the_numpy_forward(tmp_path, shards, dtype):
  """Single-file and sharded (index.json) safetensors; bf16 tensors load as f32 params."""
  tensors = {name: v.astype(jnp.dtype(dtype))
             for name, v in random_tensors("hf", with_lm_head=False).items()}
  src = write_checkpoint(tmp_path / "hf", hf_config(tied=True), tensors, shards=shards)
  model = load_mamba2(src)
  c = model.config
  assert (c.d_model, c.n_layers, c.d_state, c.head_dim, c.n_groups, c.d_conv, c.chunk_len,
          c.padded_vocab_size, c.tie_embeddings) == (D_MODEL, N_LAYERS, D_STATE, HEAD_DIM,
                                                     N_GROUPS, D_CONV, CHUNK, VOCAB_ROWS, True)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model)))
  tokens = sample_tokens()
  logits = logits_of(model, jnp.asarray(tokens))
  assert logits.shape == (2, tokens.shape[1], VOCAB_ROWS)
  assert rel_err(logits, reference_logits(tensors, "hf", tokens, tied=True)) < 1e-5


def test_state_spaces_layout_matches_the_numpy_forward(tmp_path):
  tensors = random_tensors("state-spaces", with_lm_head=True, seed=2)
  src = write_checkpoint(tmp_path / "ss", state_spaces_config(tied=False), tensors)
  model = load_mamba2(src)
  assert model.config.vocab_size == VOCAB and model.config.padded_vocab_size == VOCAB_ROWS
  assert not model.config.tie_embeddings
  tokens = sample_tokens(seed=3)
  logits = logits_of(model, jnp.asarray(tokens))
  assert rel_err(logits, reference_logits(tensors, "state-spaces", tokens, tied=False)) < 1e-5


def test_both_layouts_give_the_same_params(tmp_path):
  """The same weights under either naming load to identical params; a tied state-spaces
  checkpoint may carry lm_head.weight (torch saves tied tensors under both names)."""
  hf = random_tensors("hf", with_lm_head=False, seed=4)
  ss = {name.replace("embeddings", "embedding"): v for name, v in hf.items()}
  ss["lm_head.weight"] = ss["backbone.embedding.weight"].copy()
  from_hf = load_mamba2(write_checkpoint(tmp_path / "hf", hf_config(tied=True), hf))
  from_ss = load_mamba2(write_checkpoint(tmp_path / "ss", state_spaces_config(tied=True), ss))
  hf_params = nnx.to_pure_dict(nnx.state(from_hf, nnx.Param))
  ss_params = nnx.to_pure_dict(nnx.state(from_ss, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, hf_params, ss_params)
  # Spot-check the layout: torch Linear [out, in] -> kernel [in, out]; conv [C,1,K] -> [K,C].
  np.testing.assert_array_equal(hf_params["layers"]["mixer"]["in_proj"]["kernel"][1],
                                hf["backbone.layers.1.mixer.in_proj.weight"].T)
  np.testing.assert_array_equal(hf_params["layers"]["mixer"]["conv_weight"][0],
                                hf["backbone.layers.0.mixer.conv1d.weight"][:, 0, :].T)


def test_compute_dtype_and_ssd_impl_are_passed_through(tmp_path):
  tensors = random_tensors("hf", with_lm_head=False)
  src = write_checkpoint(tmp_path / "hf", hf_config(tied=True), tensors)
  model = load_mamba2(src, compute_dtype="bfloat16", ssd_impl="xla")
  assert model.config.compute_dtype == jnp.bfloat16 and model.config.ssd_impl == "xla"
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model)))


# --------------------------------------------------------------------------- errors


def _expect_error(tmp_path, tensors, match, layout="hf", config=None):
  config = config or (hf_config(tied=True) if layout == "hf" else state_spaces_config(True))
  src = write_checkpoint(tmp_path / "bad", config, tensors)
  with pytest.raises(CheckpointError, match=match):
    load_mamba2(src)


def test_misshapen_tensor_is_named_with_both_shapes(tmp_path):
  tensors = random_tensors("hf", with_lm_head=False)
  name = "backbone.layers.1.mixer.in_proj.weight"
  tensors[name] = tensors[name].T.copy()
  _expect_error(tmp_path, tensors, rf"tensor {name}: expected shape \({W}, {D_MODEL}\), got "
                                   rf"\({D_MODEL}, {W}\)")


def test_missing_tensor_is_named(tmp_path):
  tensors = random_tensors("hf", with_lm_head=False)
  del tensors["backbone.layers.0.mixer.D"]
  _expect_error(tmp_path, tensors, r"missing tensors: backbone\.layers\.0\.mixer\.D")


def test_missing_untied_head_is_named(tmp_path):
  tensors = random_tensors("state-spaces", with_lm_head=False)
  _expect_error(tmp_path, tensors, r"missing tensors: lm_head\.weight", layout="state-spaces",
                config=state_spaces_config(tied=False))


def test_unexpected_tensor_is_named(tmp_path):
  tensors = random_tensors("hf", with_lm_head=False)
  tensors["backbone.layers.2.mixer.D"] = np.ones(H, np.float32)  # a third layer
  _expect_error(tmp_path, tensors, r"unexpected tensors: backbone\.layers\.2\.mixer\.D")


def test_wrong_layout_names_are_reported(tmp_path):
  """HF names under a state-spaces config: the embedding is both missing and unexpected."""
  tensors = random_tensors("hf", with_lm_head=False)
  _expect_error(tmp_path, tensors, r"missing tensors: backbone\.embedding\.weight(.|\n)*"
                r"unexpected tensors: backbone\.embeddings\.weight",
                layout="state-spaces", config=state_spaces_config(tied=True))


def test_tied_head_that_differs_is_an_error(tmp_path):
  tensors = random_tensors("state-spaces", with_lm_head=True)
  _expect_error(tmp_path, tensors, r"lm_head\.weight differs", layout="state-spaces")


@pytest.mark.parametrize("change,match", [
    ({"d_intermediate": 128}, "d_intermediate"),
    ({"attn_layer_idx": [1]}, "attn_layer_idx"),
    ({"ssm_cfg": {"layer": "Mamba1"}}, "Mamba2"),
    ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "D_has_hdim"),
    ({"ssm_cfg": {"layer": "Mamba2", "mystery": 1}}, "mystery"),
])
def test_unsupported_state_spaces_configs(tmp_path, change, match):
  config = {**state_spaces_config(tied=True), **change}
  _expect_error(tmp_path, random_tensors("state-spaces", with_lm_head=False), match,
                layout="state-spaces", config=config)


def test_unsupported_hf_config_and_missing_files(tmp_path):
  _expect_error(tmp_path, random_tensors("hf", with_lm_head=False), "use_bias",
                config={**hf_config(tied=True), "use_bias": True})
  _expect_error(tmp_path / "b", random_tensors("hf", with_lm_head=False), "num_heads",
                config={**hf_config(tied=True), "num_heads": 4})
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_mamba2(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_config(tied=True)))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_mamba2(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="looks like the hf layout"):  # forced, wrongly
    load_mamba2(write_checkpoint(tmp_path / "hf", hf_config(tied=True),
                                 random_tensors("hf", with_lm_head=False)),
                format="state-spaces")


# --------------------------------------------------------------------------- torch .bin


def test_missing_torch_error_is_actionable(tmp_path, monkeypatch):
  directory = tmp_path / "bin"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(state_spaces_config(tied=True)))
  (directory / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
    load_mamba2(directory)


def test_state_spaces_pytorch_bin(tmp_path):
  # Not in CI: the only torch its machines can install is PyPI's x86_64 build (a 555 MB
  # wheel that pulls several GB of CUDA 13 libraries); the CPU-only wheels are on an index
  # they cannot reach. Runs wherever `pip install -e ".[torch]"` was done.
  torch = pytest.importorskip(
      "torch", reason="torch not installed (only a multi-GB CUDA build is on PyPI for x86_64)")
  tensors = random_tensors("state-spaces", with_lm_head=True, seed=5)
  directory = tmp_path / "bin"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(state_spaces_config(tied=False)))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             directory / "pytorch_model.bin")
  model = load_mamba2(directory)
  tokens = sample_tokens(seed=6)
  logits = logits_of(model, jnp.asarray(tokens))
  assert rel_err(logits, reference_logits(tensors, "state-spaces", tokens, tied=False)) < 1e-5


# --------------------------------------------------------------------------- Orbax + CLI


def test_cli_writes_a_checkpoint_that_restores_to_identical_logits(tmp_path):
  tensors = random_tensors("state-spaces", with_lm_head=True, seed=2)
  src = write_checkpoint(tmp_path / "ss", state_spaces_config(tied=False), tensors)
  out = tmp_path / "orbax"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "ma2mba_jax.convert", "--src", str(src),
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "state-spaces layout" in result.stdout
  converted = load_mamba2(src)
  assert f"params: {converted.num_params():,}" in result.stdout
  assert (out / "params").is_dir() and (out / "model_config.json").is_file()

  restored = restore_model(out)
  assert restored.config == converted.config
  tokens = jnp.asarray(sample_tokens(seed=3))
  np.testing.assert_array_equal(logits_of(restored, tokens), logits_of(converted, tokens))


def test_save_restore_roundtrip_and_overwrite(tmp_path):
  tensors = random_tensors("hf", with_lm_head=False)
  model = load_mamba2(write_checkpoint(tmp_path / "hf", hf_config(tied=True), tensors))
  out = save_model(model, tmp_path / "saved")
  assert out.is_absolute()
  with pytest.raises(FileExistsError, match="overwrite"):
    save_model(model, tmp_path / "saved")
  save_model(model, tmp_path / "saved", overwrite=True)
  restored = restore_model(tmp_path / "saved", compute_dtype="bfloat16")
  assert restored.config == model.config.replace(compute_dtype="bfloat16")
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)),
               nnx.to_pure_dict(nnx.state(restored)))
  meta = json.loads((tmp_path / "saved" / "model_config.json").read_text())
  assert meta["num_params"] == model.num_params()
  assert meta["model_class"] == "ma2mba_jax.models.mamba2:Mamba2LM"


def test_config_json_codec():
  config = mamba2_config("2.7b", compute_dtype="bfloat16", dt_limit=(0.001, math.inf))
  assert decode_config(json.loads(json.dumps(encode_config(config)))) == config
  with pytest.raises(ValueError, match="refusing"):
    decode_config({"__dataclass__": "os:PathLike", "fields": {}})



@pytest.mark.parametrize("infinity", [float("inf"), "inf", "Infinity", {"__float__": "Infinity"}])
def test_time_step_limit_spellings(tmp_path, infinity):
  """However a writer spells infinity in config.json, dt_limit reads as (0, inf)."""
  config = {**hf_config(tied=True), "time_step_limit": [0.0, infinity]}
  directory = tmp_path / "hf"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config))
  parsed, layout = read_config(directory)
  assert layout == "hf" and parsed.dt_limit == (0.0, math.inf)
  config["time_step_limit"] = [0.0, "lots"]
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="time_step_limit"):
    read_config(directory)
