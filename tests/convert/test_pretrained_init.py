"""config.model.vision_init / llm_init (convert/pretrained.py) put HF checkpoints into the
freshly initialised parameters; checkpoints that do not fit are refused naming the config
field, the directory, the fields and the tensors. The tokenizer a run trained with is saved
with its export and read back by infer/checkpoint.py; an older export of a run with
data.add_special_tokens loads too."""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.convert.io import save_model
from ma2mba_jax.convert.pretrained import apply_pretrained
from ma2mba_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, vocab_size
from ma2mba_jax.infer import checkpoint
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.errors import ConfigError
from tests.convert.hf_fixtures import (neox_style_tokenizer, random_mamba2_tensors,
                                       write_hf_mamba2, write_hf_vision)

MODEL_CFG = video_config("tiny", llm_vocab_size=100, ssd_impl="xla")


def _config(**model):
  c = ml_collections.ConfigDict({"stage": 1, "init_from": "",
                                 "model": {"vision_init": "", "llm_init": "", **model}})
  return c


def _fresh_params():
  model = VideoMa2mba(MODEL_CFG, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return params, jax.tree.map(lambda _: device, params)


def test_vision_and_llm_init_replace_those_groups(tmp_path):
  vision = write_hf_vision(str(tmp_path / "clip"), MODEL_CFG.vision_config, seed=1)
  llm = write_hf_mamba2(str(tmp_path / "mamba2"), MODEL_CFG.llm_config, seed=2)
  params, shardings = _fresh_params()
  out = apply_pretrained(_config(vision_init=str(tmp_path / "clip"),
                                 llm_init=str(tmp_path / "mamba2")), MODEL_CFG, params,
                         shardings)
  want_vision = vision_ckpt.to_nnx_params(vision, MODEL_CFG.vision_config)
  want_llm = mamba2_ckpt.tensors_to_params(llm, MODEL_CFG.llm_config, "hf")
  for want, got in ((want_vision, out["vision"]), (want_llm, out["llm"])):
    jax.tree.map(lambda w, g: np.testing.assert_array_equal(np.asarray(g), w), want, got)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out["projector"], params["projector"])
  # The loaded values are not the random init's.
  assert not np.allclose(np.asarray(out["llm"]["embedding"]),
                         np.asarray(params["llm"]["embedding"]))
  # Nothing set: the parameters come back untouched.
  assert apply_pretrained(_config(), MODEL_CFG, params, shardings) is params


def test_an_llm_checkpoint_that_does_not_fit_is_named(tmp_path):
  other = MODEL_CFG.llm_config.replace(d_state=8)
  write_hf_mamba2(str(tmp_path / "narrow"), other, seed=0)
  params, shardings = _fresh_params()
  with pytest.raises(ConfigError) as err:
    apply_pretrained(_config(llm_init=str(tmp_path / "narrow")), MODEL_CFG, params, shardings)
  message = str(err.value)
  for needed in (f"config.model.llm_init={str(tmp_path / 'narrow')!r}",
                 "d_state: the model has 16, the checkpoint 8",
                 "tensor backbone.layers.0.mixer.in_proj.weight: expected shape"):
    assert needed in message, message
  # A tensor of the right shape but an integer dtype; a missing tensor.
  tensors = random_mamba2_tensors(MODEL_CFG.llm_config, seed=0)
  tensors["backbone.layers.1.mixer.D"] = np.zeros(tensors["backbone.layers.1.mixer.D"].shape,
                                                  np.int64)
  del tensors["backbone.norm_f.weight"]
  write_hf_mamba2(str(tmp_path / "bad"), MODEL_CFG.llm_config, seed=0, tensors=tensors)
  with pytest.raises(ConfigError) as err:
    apply_pretrained(_config(llm_init=str(tmp_path / "bad")), MODEL_CFG, params, shardings)
  assert "tensor backbone.layers.1.mixer.D: dtype int64" in str(err.value)
  assert "missing tensors: backbone.norm_f.weight" in str(err.value)
  with pytest.raises(ConfigError, match=r"config\.model\.vision_init='nowhere': no such "
                     "directory"):
    apply_pretrained(_config(vision_init="nowhere"), MODEL_CFG, params, shardings)


def test_vision_checkpoint_of_another_width_is_named(tmp_path):
  wide = dataclasses.replace(MODEL_CFG.vision_config, width=48, n_heads=4)
  write_hf_vision(str(tmp_path / "wide"), wide, seed=0)
  params, shardings = _fresh_params()
  with pytest.raises(ConfigError) as err:
    apply_pretrained(_config(vision_init=str(tmp_path / "wide")), MODEL_CFG, params, shardings)
  message = str(err.value)
  assert "config.model.vision_init=" in message and str(tmp_path / "wide") in message
  assert "width: the model has 32, the checkpoint 48" in message
  assert ("vision_model.embeddings.patch_embedding.weight: expected shape [32, 3, 8, 8], "
          "got [48, 3, 8, 8]") in message


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def neox_tokenizer(tmp_path_factory, demo_data):
  path = str(tmp_path_factory.mktemp("tok") / "neox.json")
  return neox_style_tokenizer(demo_data, path)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  from ma2mba_jax.data import synthetic
  out = tmp_path_factory.mktemp("demo_data")
  synthetic.generate(str(out), seed=0, size="tiny", frame_size=32)
  return str(out)


def _tiny_model(tokenizer):
  cfg = video_config("tiny", llm_vocab_size=vocab_size(tokenizer), ssd_impl="xla")
  return VideoMa2mba(cfg, rngs=nnx.Rngs(0))


def test_saved_tokenizer_is_the_one_loaded(neox_tokenizer, tmp_path):
  with pytest.raises(Exception, match="lacks the chat template's special token"):
    load_tokenizer(neox_tokenizer)
  trained = load_tokenizer(neox_tokenizer, add_missing=True)
  model = _tiny_model(trained)
  workdir = tmp_path / "work"
  save_model(model, workdir / "model", tokenizer=trained)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (workdir / "model" / name).is_file()
  meta = json.loads((workdir / "model" / "tokenizer_config.json").read_text())
  assert meta["ma2mba_chat"]["special_token_ids"]["frame"] == trained.token_to_id("<|frame|>")
  # No config.json in the workdir, the training tokenizer file gone: the saved one is used.
  _, tok = checkpoint.load(str(workdir))
  assert tok.get_vocab(with_added_tokens=True) == trained.get_vocab(with_added_tokens=True)
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == \
      [trained.token_to_id(t) for t in SPECIAL_TOKENS]
  text = "<|user|> a red circle"
  assert tok.encode(text).ids == trained.encode(text).ids  # special strings stay text
  assert checkpoint.resolve(str(workdir / "model"))[1] == str(workdir / "model" /
                                                                 "tokenizer.json")


def test_older_export_of_a_run_that_added_special_tokens(neox_tokenizer, tmp_path):
  """No tokenizer.json in the export (as before): the config's tokenizer, with the special
  tokens appended as training did (this was a DataError)."""
  trained = load_tokenizer(neox_tokenizer, add_missing=True)
  workdir = tmp_path / "work"
  save_model(_tiny_model(trained), workdir / "model")
  with open(workdir / "config.json", "w") as f:
    json.dump({"data": {"tokenizer": neox_tokenizer, "synthetic_dir": "",
                        "add_special_tokens": True}}, f)
  _, tok = checkpoint.load(str(workdir))
  assert tok.get_vocab(with_added_tokens=True) == trained.get_vocab(with_added_tokens=True)
  with open(workdir / "config.json", "w") as f:
    json.dump({"data": {"tokenizer": neox_tokenizer, "synthetic_dir": ""}}, f)
  with pytest.raises(Exception, match="lacks the chat template's special token"):
    checkpoint.load(str(workdir))
