"""The remat policies on the real (tiny) Mamba-2 LM keep their memory promise, read from the
compiled forward+backward (XLA's memory_analysis), not from the values they compute (which
are the same under every policy, see test_lm_policies.py; a policy that stops
rematerialising would pass that test).

Setup: 6 layers, 1 x 512 tokens, d_model 64, the Mamba-2 block differentiated by JAX
(block_impl "autodiff" where that option exists: a hand-written backward saves less per
layer, and the point here is the policies, not the block). At this length the activations a
layer saves for its backward (in_proj output, conv, SSD chunk states, ...) are about 9x its
input h [1, 512, 64], so what each policy keeps is what decides the temp memory:

  none   every layer's activations                      about 6 x A
  layer  6 inputs + one layer's activations (recompute)  about 6 x h + A
  sqrt   3 group inputs + a group (2 layers) recomputed  about 3 x h + 2 x A
  magc   l=2 x s=64 cells: inputs and states at the grid, one cell's activations at a time

Measured (2 cores, jax 0.11.2): none 54.0 MiB, layer 11.5, sqrt 23.6, magc(2, 64) 5.0.
The assertions keep about 1.4x or more of margin on each side of those numbers.
"""


import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2Config, Mamba2LM
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat.lm import apply_layers_with_remat
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets

SEQLEN, N_LAYERS = 512, 6
# Backend optimisation off: faster compiles, and the unfused graph makes what each policy
# saves stand out. With the CPU backend's default optimisation the same shapes gave none
# 13.3, layer 11.1, sqrt 11.4, magc 3.5 MiB: fusion recomputes most cheap activations inside
# the backward anyway, and one layer's backward workspace dominates, so none and layer are
# close there (a GPU compile at real sizes is what BENCHMARKS.md measures).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def remat_cfg(policy, l=None, s=None):
  return RematSettings(policy=policy, l=l, s=s, cell_saves="nothing", save_names=(),
                       offload="none")


POLICIES = {"none": remat_cfg("none"), "layer": remat_cfg("layer"), "sqrt": remat_cfg("sqrt"),
            "magc": remat_cfg("magc", l=2, s=64)}


@pytest.fixture(scope="module")
def temp_mib():
  """policy -> temp bytes (MiB) of the compiled value_and_grad of the next-token loss."""
  overrides = dict(n_layers=N_LAYERS, ssd_impl="xla")
  if "block_impl" in Mamba2Config.__dataclass_fields__:
    overrides["block_impl"] = "autodiff"
  cfg = mamba2_config("tiny", **overrides)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, SEQLEN), jnp.int32)
  out = {}
  for name, rc in POLICIES.items():
    def loss(params, tokens, rc=rc):
      model = nnx.merge(graphdef, params)
      h, _ = apply_layers_with_remat(model, model.embed(tokens), rc)
      targets, weights = shift_targets(tokens, jnp.ones_like(tokens, dtype=bool))
      total, count = blockwise_cross_entropy(h, model.head, targets, weights, block_len=256)
      return total / count
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile(
        compiler_options=FAST_COMPILE)
    out[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return out


def test_layer_and_sqrt_keep_less_than_none(temp_mib):
  m = temp_mib
  # layer: 6 h + 1 A against 6 A (measured 11.5 vs 54.0 MiB).
  assert m["layer"] < m["none"] / 3, m
  # sqrt: 3 h + 2 A against 6 A (measured 23.6 vs 54.0); more than layer at this width,
  # where A >> h (23.6 vs 11.5).
  assert m["sqrt"] < m["none"] * 0.6, m
  assert m["sqrt"] > m["layer"] * 1.4, m


def test_magc_keeps_less_than_every_layer_wise_policy(temp_mib):
  # One cell's activations (2 layers x 64 tokens) instead of a whole layer's (measured
  # 5.0 vs 11.5 for layer).
  m = temp_mib
  assert m["magc"] < m["layer"] / 1.5, m
  assert m["magc"] < m["none"] / 6, m
