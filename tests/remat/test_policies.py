"""Every remat policy computes the same loss and gradients; MA-GC handles ragged grids."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.remat.policies import apply_with_remat, sqrt_group_size
from ma2mba_jax.remat.settings import RematSettings
from tests.remat import toy_stack

N_LAYERS, BATCH, SEQLEN = 5, 2, 37


def remat_cfg(policy, l=None, s=None, cell_saves="nothing", offload="none"):
  return RematSettings(policy=policy, l=l, s=s, cell_saves=cell_saves, save_names=(),
                       offload=offload)


def problem():
  params = toy_stack.init_params(jax.random.key(0), N_LAYERS)
  h0 = jax.random.normal(jax.random.key(1), (BATCH, SEQLEN, toy_stack.D))
  conv0, ssm0 = toy_stack.zero_states(N_LAYERS, BATCH)
  conv0 = conv0 + 0.3   # nonzero initial states, so their gradients are exercised
  ssm0 = ssm0 + 0.1
  target = jax.random.normal(jax.random.key(2), h0.shape)
  return (params, h0, conv0, ssm0), target


def value_and_grad_fn(cfg, target):
  def loss(params, h0, conv0, ssm0):
    h, conv, ssm = apply_with_remat(toy_stack.layer_fn, params, h0, conv0, ssm0, cfg)
    return jnp.mean((h - target) ** 2) + 0.1 * jnp.mean(conv ** 2) + 0.1 * jnp.mean(ssm ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def loss_and_grads(cfg):
  args, target = problem()
  return jax.jit(value_and_grad_fn(cfg, target))(*args)


@pytest.fixture(scope="module")
def reference():
  return loss_and_grads(remat_cfg("none"))


@pytest.mark.parametrize("cfg", [
    remat_cfg("layer"),
    remat_cfg("sqrt"),
    remat_cfg("magc", l=2, s=16),          # L % l = 1, T % s = 5
    remat_cfg("magc", l=5, s=8),           # one group, blocks of one SSD chunk
    remat_cfg("magc", l=1, s=40),          # one (short) block
    remat_cfg("magc", l=3, s=16, cell_saves="dots"),
    remat_cfg("magc", l=2, s=16, offload="sequence"),
    remat_cfg("magc", l=3, s=8, cell_saves="layers", offload="all"),
    remat_cfg("layer", offload="all"),
], ids=lambda c: f"{c.policy}-l{c.l}-s{c.s}-{c.cell_saves}-offload_{c.offload}")
def test_same_loss_and_gradients(reference, cfg):
  (loss_ref, grads_ref) = reference
  loss, grads = loss_and_grads(cfg)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  flat_ref, _ = jax.tree.flatten(grads_ref)
  flat, _ = jax.tree.flatten(grads)
  for g, g_ref in zip(flat, flat_ref):
    assert float(jnp.max(jnp.abs(g_ref))) > 0
    np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("offload,n_tags", [("sequence", 2), ("all", 3)])
def test_offload_moves_the_tagged_checkpoints_to_host(offload, n_tags):
  """The gradient's program moves each cell's tagged inputs to pinned host memory (on CPU,
  XLA then drops the moves, so this is checked on the jaxpr; the GPU bench measures it)."""
  args, target = problem()
  jaxpr = str(jax.make_jaxpr(value_and_grad_fn(remat_cfg("magc", l=5, s=8, offload=offload),
                                               target))(*args))
  to_host = [line for line in jaxpr.splitlines()
             if "device_put" in line and "<host>" in line.split("=")[0]]
  assert len(to_host) >= n_tags, jaxpr
  assert "device_put" not in str(jax.make_jaxpr(
      value_and_grad_fn(remat_cfg("magc", l=5, s=8), target))(*args))


def test_sqrt_group_size():
  assert [sqrt_group_size(n) for n in (1, 4, 24, 48, 64)] == [1, 2, 5, 7, 8]


def test_unknown_policy_and_unresolved_magc():
  with pytest.raises(ValueError, match="config.remat.policy='fast' is not one of"):
    loss_and_grads(remat_cfg("fast"))
  with pytest.raises(ValueError, match="resolved positive ints"):
    loss_and_grads(remat_cfg("magc", l="auto", s="auto"))
  with pytest.raises(ValueError, match="config.remat.offload='disk' is not one of"):
    loss_and_grads(remat_cfg("magc", l=2, s=8, offload="disk"))
