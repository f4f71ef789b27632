"""MA-GC over fused blocks with its own backward (remat/magc_fused.py) computes the plain
layer stack's function and every gradient, and keeps less than autodiff's MA-GC.

Oracle: the plain stack (`policy="none"`: a scan of the fused blocks, differentiated by
JAX; the fused block itself is checked against autodiff of the plain block in
tests/models/test_fused_block.py). The function differentiated is a weighted sum of the
output h and of sin/cos of every layer's final states, from random initial states, with a
packed-segment reset in one row: every input (parameters, h, both initial states) gets a
cotangent through every path (the output h and the final states), and the reset path runs.

Tolerance: tests/remat/magc_fused_sweep.py over 24 seeds (float32, CPU), worst relative
error (max |a - b| / max |b| per leaf): l2-s16-nothing 9.16e-07 (D, seed 8), l1-s8-layers
8.97e-07 (norm weight, seed 2), l4-s48-nothing 0 (one cell: the plain scan's own
arithmetic); asserted at 1e-5.

bfloat16 compute: the SSM state checkpoints are then kept in bf16
(`magc_fused.STATE_CHECKPOINTS_IN_COMPUTE_DTYPE`), so the backward replays from rounded
states. Measured against the float32 plain stack (same parameters and inputs), the same
sweep with --compute_dtype=bfloat16, 24 seeds, worst leaf: the plain bf16 stack 1.43e-2;
MA-GC with float32 checkpoints 1.29e-2 / 1.56e-2 / 1.43e-2 (l2-s16-nothing, l1-s8-layers,
l4-s48-nothing), with bf16 checkpoints 1.36e-2 / 1.61e-2 / 1.66e-2; asserted at 2.5e-2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.models.mamba2 import LayerStates, Mamba2LM
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat import magc_fused
from ma2mba_jax.remat.lm import apply_layers_with_remat
from ma2mba_jax.remat.policies import apply_with_remat
from ma2mba_jax.remat.settings import RematSettings

BATCH, SEQLEN, N_LAYERS = 2, 48, 4
TOLERANCE = 1e-5
TOLERANCE_BF16_VS_F32 = 2.5e-2
# (l, s, cell_saves): two groups of two blocks; one layer per group with blocks of 8 (T/s =
# 6, replays of one layer); one cell of everything.
CONFIGS = {"l2-s16-nothing": (2, 16, "nothing"), "l1-s8-layers": (1, 8, "layers"),
           "l4-s48-nothing": (4, 48, "nothing")}


def magc_cfg(l, s, cell_saves):
  return RematSettings(policy="magc", l=l, s=s, cell_saves=cell_saves, offload="none")


def problem(seed: int, compute_dtype: str = "float32"):
  cfg = mamba2_config("tiny", n_layers=N_LAYERS, ssd_impl="xla", compute_dtype=compute_dtype)
  graphdef, state = nnx.split(Mamba2LM(cfg, rngs=nnx.Rngs(seed)))
  params = dict(state.items())
  keys = jax.random.split(jax.random.key(1000 + seed), 5)
  states = nnx.merge(graphdef, state).init_states(BATCH)
  h = jax.random.normal(keys[0], (BATCH, SEQLEN, cfg.d_model))
  conv = jax.random.normal(keys[1], states.conv.shape)
  ssm = jax.random.normal(keys[2], states.ssm.shape)
  reset = jnp.zeros((BATCH, SEQLEN), bool).at[1, 21].set(True)   # a segment starts at 21
  weight = jax.random.normal(keys[3], (BATCH, SEQLEN, cfg.d_model))
  return cfg, graphdef, params, (h, conv, ssm), reset, weight


@functools.cache
def _compiled(graphdef, remat_cfg):
  """jit(value_and_grad) of the test function, one per (graphdef, settings): the seed sweep
  reuses the compile."""
  def f(layers, rest, h, conv, ssm, reset, weight):
    model = nnx.merge(graphdef, {**rest, "layers": layers})
    out, states = apply_layers_with_remat(model, h, remat_cfg, LayerStates(conv, ssm), reset)
    return (jnp.sum(out * weight) + jnp.sum(jnp.sin(states.conv))
            + jnp.sum(jnp.cos(states.ssm)))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 2, 3, 4)))


def value_and_grads(prob, remat_cfg):
  """-> (value, (d layers, dh, dconv, dssm)); the embedding and final norm are unused."""
  cfg, graphdef, params, inputs, reset, weight = prob
  rest = {k: v for k, v in params.items() if k != "layers"}
  return _compiled(graphdef, remat_cfg)(params["layers"], rest, *inputs, reset, weight)


def errors(prob, reference, remat_cfg) -> dict[str, float]:
  """Leaf -> max |a - b| / max |b| of value and gradients against `reference`."""
  got = value_and_grads(prob, remat_cfg)
  out = {}
  for (path, ref), value in zip(jax.tree.leaves_with_path(reference), jax.tree.leaves(got)):
    scale = float(jnp.max(jnp.abs(ref)))
    assert scale > 0, jax.tree_util.keystr(path)
    out[jax.tree_util.keystr(path)] = float(jnp.max(jnp.abs(value - ref))) / scale
  return out


@pytest.fixture(scope="module")
def prob_and_reference():
  prob = problem(0)
  return prob, value_and_grads(prob, RematSettings(policy="none"))


@pytest.mark.parametrize("name", CONFIGS)
def test_same_value_and_every_gradient(prob_and_reference, name):
  prob, reference = prob_and_reference
  cfg = magc_cfg(*CONFIGS[name])
  assert magc_fused.applies(prob[0], cfg, N_LAYERS, SEQLEN)
  worst = errors(prob, reference, cfg)
  assert max(worst.values()) < TOLERANCE, worst


@pytest.mark.parametrize("name", ["l2-s16-nothing", "l1-s8-layers"])
def test_bfloat16_gradients_stay_near_float32(prob_and_reference, name):
  """bf16 compute (state checkpoints in bf16): value and gradients as close to the float32
  plain stack's as the bf16 sweep found (module docstring)."""
  _, truth = prob_and_reference
  worst = errors(problem(0, "bfloat16"), truth, magc_cfg(*CONFIGS[name]))
  assert max(worst.values()) < TOLERANCE_BF16_VS_F32, worst


def test_applies_only_where_it_can():
  cfg = mamba2_config("tiny", n_layers=N_LAYERS)
  ok = magc_cfg(2, 16, "nothing")
  assert magc_fused.applies(cfg, ok, N_LAYERS, SEQLEN)
  assert not magc_fused.applies(cfg, ok, N_LAYERS, SEQLEN + 1)           # s does not divide T
  assert not magc_fused.applies(cfg, ok.replace(l=3), N_LAYERS, SEQLEN)  # l does not divide L
  assert not magc_fused.applies(cfg, ok.replace(offload="sequence"), N_LAYERS, SEQLEN)
  assert not magc_fused.applies(cfg, ok.replace(cell_saves="dots"), N_LAYERS, SEQLEN)
  assert not magc_fused.applies(cfg.replace(block_impl="autodiff"), ok, N_LAYERS, SEQLEN)
  with pytest.raises(ValueError, match="l=3"):
    magc_fused.apply(cfg, None, jnp.zeros((1, SEQLEN, cfg.d_model)),
                     jnp.zeros((N_LAYERS, 1, 1, 1)), None, ok.replace(l=3))
