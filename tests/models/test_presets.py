"""Mamba-2 presets: parameter counts of the released sizes (from shapes only) and lookup."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import MAMBA2_PRESETS, mamba2_config

# (layers, d_model, nominal size, exact count). The exact counts follow from the shapes of
# the released checkpoints: embedding 50288 x D (tied), per layer in_proj D x (4D + 256 + H),
# conv (2D + 256) x 5, dt_bias / A_log / D 3H, gated norm 2D, out_proj 2D x D, norm D; H = D/32.
RELEASED = {
    "130m": (24, 768, 130e6, 128_989_632),
    "370m": (48, 1024, 370e6, 368_346_624),
    "780m": (48, 1536, 780e6, 780_161_280),
    "1.3b": (48, 2048, 1.3e9, 1_343_757_312),
    "2.7b": (64, 2560, 2.7e9, 2_702_599_680),
}


def closed_form_count(n_layers: int, d: int, vocab_rows: int = 50288) -> int:
  heads = 2 * d // 64
  per_layer = (d * (4 * d + 2 * 128 + heads) + (2 * d + 256) * 5 + 3 * heads + 2 * d
               + 2 * d * d + d)
  return vocab_rows * d + n_layers * per_layer + d


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_parameter_counts(name):
  n_layers, d_model, nominal, exact = RELEASED[name]
  config = mamba2_config(name)
  assert (config.n_layers, config.d_model) == (n_layers, d_model)
  assert config.padded_vocab_size == 50288
  model = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  count = model.num_params()
  assert count == exact == closed_form_count(n_layers, d_model)
  # The names are rounded: within 4% (1.3b has 1.34B parameters).
  assert abs(count - nominal) / nominal < 0.04


def test_released_presets_share_the_paper_hyperparameters():
  for name in RELEASED:
    c = MAMBA2_PRESETS[name]
    assert (c.d_state, c.head_dim, c.expand, c.n_groups, c.d_conv, c.chunk_len) == (
        128, 64, 2, 1, 4, 256), name
    assert c.vocab_size == 50277 and c.tie_embeddings
    assert c.param_dtype == jnp.float32


def test_paper_memory_constants_from_config():
  """paper-notes Table 7 constants follow from the derived sizes (C_S, C_grid, C_state)."""
  table7 = {"370m": (269_056, 6_432, 264_448), "1.3b": (537_344, 12_608, 528_640),
            "2.7b": (671_488, 15_696, 660_736)}
  for name, (c_s, c_grid, c_state) in table7.items():
    c = mamba2_config(name)
    assert c.d_inner * c.d_state + 3 * c.conv_dim == c_s
    assert c.d_in_proj + c.d_inner == c_grid
    assert c.d_inner * c.d_state + c.conv_dim == c_state


def test_overrides_and_unknown_names():
  c = mamba2_config("2.7b", compute_dtype="bfloat16", ssd_impl="xla")
  assert c.compute_dtype == jnp.bfloat16 and c.ssd_impl == "xla" and c.n_layers == 64
  assert MAMBA2_PRESETS["2.7b"].compute_dtype == jnp.float32  # presets are not mutated
  with pytest.raises(ValueError, match=r"unknown Mamba-2 preset '7b'.*130m.*2\.7b.*tiny"):
    mamba2_config("7b")


def test_config_validation():
  with pytest.raises(ValueError, match="head_dim"):
    mamba2_config("tiny", head_dim=48)
  with pytest.raises(ValueError, match="n_groups"):
    mamba2_config("tiny", n_groups=3)
  with pytest.raises(ValueError, match="compute_dtype"):
    mamba2_config("tiny", compute_dtype="float16")
  with pytest.raises(ValueError, match="dt_limit"):
    mamba2_config("tiny", dt_limit=(0.5, 0.1))
