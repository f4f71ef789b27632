"""The tiny Mamba-2 LM trains to the same loss and gradients under every remat policy.

Batch 2, T = 37 tokens (not a multiple of s), 5 layers (not a multiple of l), next-token
cross-entropy through the real embedding, blocks and head -- what the trainer computes.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat.lm import apply_layers_with_remat
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets

BATCH, SEQLEN, N_LAYERS = 2, 37, 5


def remat_cfg(policy, l=None, s=None, cell_saves="nothing", offload="none"):
  return RematSettings(policy=policy, l=l, s=s, cell_saves=cell_saves,
                       save_names=("mamba2_in_proj",), offload=offload)


@pytest.fixture(scope="module")
def problem():
  cfg = mamba2_config("tiny", n_layers=N_LAYERS, ssd_impl="xla")
  graphdef, params = nnx.split(Mamba2LM(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQLEN), 0, cfg.vocab_size)
  return graphdef, params, tokens


def loss_and_grads(problem, cfg):
  graphdef, params, tokens = problem

  def loss(params):
    model = nnx.merge(graphdef, params)
    h, _ = apply_layers_with_remat(model, model.embed(tokens), cfg)
    targets, weights = shift_targets(tokens, jnp.ones_like(tokens, dtype=bool))
    total, count = blockwise_cross_entropy(h, model.head, targets, weights)
    return total / count

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference(problem):
  return loss_and_grads(problem, remat_cfg("none"))


@pytest.mark.parametrize("cfg", [
    remat_cfg("layer"),
    remat_cfg("sqrt"),
    remat_cfg("magc", l=2, s=16),                               # 5 % 2 = 1, 37 % 16 = 5
    remat_cfg("magc", l=3, s=32, cell_saves="layers"),
    remat_cfg("magc", l=2, s=16, cell_saves="names"),
    remat_cfg("magc", l=5, s=16, cell_saves="dots", offload="all"),
], ids=lambda c: f"{c.policy}-l{c.l}-s{c.s}-{c.cell_saves}-offload_{c.offload}")
def test_same_loss_and_every_gradient(problem, reference, cfg):
  loss_ref, grads_ref = reference
  loss, grads = loss_and_grads(problem, cfg)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  flat_ref = jax.tree.leaves_with_path(grads_ref)
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref)
  for g, (path, g_ref) in zip(flat, flat_ref):
    assert float(jnp.max(jnp.abs(g_ref))) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, g_ref, rtol=5e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
