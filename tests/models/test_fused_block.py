"""The fused Mamba-2 block (models/fused_block.py) is the autodiff block with less memory.

  * same outputs, final states and every gradient (parameters, h, both input states) as
    autodiff of `Mamba2Block`, float32, odd lengths, nonzero states, n_groups 1 and 2, a
    clipping dt_limit;
  * XLA's compiled memory of a no-remat layer stack's gradient grows by the design's bytes
    per token per layer (h in f32 + the in_proj output), a small fraction of autodiff's;
  * an outer jax.checkpoint's policy (MA-GC's cell_saves) still sees what the block keeps.

Tolerances come from `tests/models/fused_block_sweep.py` (seeds 0..23, float32, CPU):
the largest relative error (||a - b|| / ||b||, per output and per gradient leaf) over
24 seeds was, on 2026-11-26:
  g1:    outputs 0 (bit-identical), gradients 1.83e-7 (in_proj kernel; h 3.8e-8)
  g2_dt: outputs 0 (bit-identical), gradients 1.79e-7 (out_proj kernel; h 3.9e-8)
(every other gradient bit-identical), so TOL = 2e-6 is about 10x the worst seen. A wrong
backward term shows as 1e-2 or more. (bfloat16 compute, same sweep: outputs identical,
gradients within 2.0e-4, grad.h the worst; not a test here.)

Letters: B batch, T time, D model width, F in_proj width, L layers.
"""

from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2Block, Mamba2LM, block_apply
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.testing import rel_err

FAST_COMPILE = {"xla_backend_optimization_level": 0}
TOL = 2e-6
BATCH, SEQLEN = 2, 37          # 37 = 2 * 16 + 5: not a multiple of the chunk (16 or 8)

CONFIGS = {
    "g1": mamba2_config("tiny", ssd_impl="xla"),
    # Groups > 1, a short chunk and a dt_limit that clips (its gradient is zero there).
    "g2_dt": mamba2_config("tiny", ssd_impl="xla", n_groups=2, d_model=48, chunk_len=8,
                           dt_limit=(0.002, 0.05)),
}


def problem(config, seed: int):
  """Random (not initial) layer params, h, nonzero states and cotangents for all outputs."""
  graphdef, params = nnx.split(Mamba2Block(config, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  normal = lambda shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  # Perturb every parameter, so weights of ones (norms, D) are not special.
  params = jax.tree.map(lambda a: a + normal(a.shape, 0.2), params)
  c = config
  h = normal((BATCH, SEQLEN, c.d_model))
  conv = normal((BATCH, c.conv_dim, c.d_conv - 1))
  ssm = normal((BATCH, c.n_heads, c.head_dim, c.d_state), 0.3)
  cotangents = (normal(h.shape), normal(conv.shape), normal(ssm.shape))
  return graphdef, params, (h, conv, ssm), cotangents


@functools.cache
def outputs_and_grads_fn(config):
  """jitted (params, inputs, cotangents) -> (h, conv_state, ssm_state),
  (d params, dh, d conv_state, d ssm_state); one compile per config and shapes."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Mamba2Block(config, rngs=nnx.Rngs(0))))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(params, inputs, cotangents):
    outs, vjp = jax.vjp(functools.partial(block_apply, graphdef), params, *inputs)
    return outs, vjp(cotangents)
  return run


def outputs_and_grads(config, params, inputs, cotangents):
  return outputs_and_grads_fn(config)(params, inputs, cotangents)


def errors(config, seed: int) -> dict[str, float]:
  """Relative error of the fused block against autodiff, per output and gradient leaf."""
  _, params, inputs, cotangents = problem(config, seed)
  ref = outputs_and_grads(config.replace(block_impl="autodiff"), params, inputs, cotangents)
  new = outputs_and_grads(config.replace(block_impl="fused"), params, inputs, cotangents)
  names = ["out.h", "out.conv_state", "out.ssm_state"]
  names += ["grad." + jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(ref[1][0])]
  names += ["grad.h", "grad.conv_state", "grad.ssm_state"]
  ref_leaves = jax.tree.leaves(ref[0]) + jax.tree.leaves(ref[1])
  new_leaves = jax.tree.leaves(new[0]) + jax.tree.leaves(new[1])
  assert len(names) == len(ref_leaves) == len(new_leaves)
  for name, r in zip(names, ref_leaves):
    assert float(np.max(np.abs(r))) > 0, f"{name}: the reference is all zeros"
  return {n: rel_err(a, b) for n, a, b in zip(names, new_leaves, ref_leaves)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_outputs_states_and_every_gradient(name):
  errs = errors(CONFIGS[name], seed=7)
  assert len(errs) == 3 + 9 + 3
  bad = {k: v for k, v in errs.items() if not v <= TOL}
  assert not bad, bad


def test_config_rejects_unknown_block_impl():
  with pytest.raises(ValueError, match="block_impl"):
    mamba2_config("tiny", block_impl="fast")


# --------------------------------------------------------------------------- memory


def stack_grad_temp_bytes(config, n_layers: int, seqlen: int) -> int:
  """XLA's temp bytes for the gradient (params and h) of `n_layers` blocks, no remat."""
  config = config.replace(n_layers=n_layers)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0))))
  h = jax.ShapeDtypeStruct((1, seqlen, config.d_model), jnp.float32)

  def loss(params, h):
    model = nnx.merge(graphdef, params)
    h, _ = model.apply_layers(h, model.init_states(1))
    return jnp.sum(h * h)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)
  return grad_fn.lower(params, h).compile().memory_analysis().temp_size_in_bytes


def test_saves_the_design_bytes_per_token_and_layer_far_below_autodiff():
  """The cost of one more layer per token, (temp(6 layers) - temp(2 layers)) / (4 T).

  Design (float32 here): h [D] f32 + in_proj output [F] = (64 + 296) * 4 = 1440 bytes.
  Measured on CPU (2026-11-26): fused 1440, autodiff 15,928.
  """
  config = mamba2_config("tiny", ssd_impl="xla")
  seqlen = 1024
  design = 4 * (config.d_model + config.d_in_proj)
  per_layer = {}
  for impl in ("fused", "autodiff"):
    cfg = config.replace(block_impl=impl)
    small, large = (stack_grad_temp_bytes(cfg, n, seqlen) for n in (2, 6))
    per_layer[impl] = (large - small) / (4 * seqlen)
  assert 0.9 * design <= per_layer["fused"] <= 1.1 * design, (per_layer, design)
  assert per_layer["autodiff"] >= 8 * per_layer["fused"], per_layer


# --------------------------------------------------------------------------- remat


def per_token_residuals(config, policy) -> list[tuple[tuple[int, ...], str]]:
  """(shape, description) of what differentiating the block keeps per token, apart from its
  arguments, under `jax.checkpoint(policy)` (policy None: no checkpoint)."""
  graphdef, params, inputs, _ = problem(config, seed=0)
  layer = functools.partial(block_apply, graphdef)
  if policy is not None:
    layer = jax.checkpoint(layer, policy=policy)
  text = io.StringIO()
  with contextlib.redirect_stdout(text):  # lines "f32[2,37,296] named 'x' from ..."
    jax.ad_checkpoint.print_saved_residuals(
        lambda p, *args: jnp.sum(layer(p, *args)[0]), params, *inputs)
  saved = []
  for line in text.getvalue().splitlines():
    dims, _, desc = line.partition(" ")
    shape = tuple(int(d) for d in dims[dims.index("[") + 1:dims.index("]")].split(",") if d)
    if "argument" not in desc and SEQLEN in shape:
      saved.append((shape, desc))
  return saved


def test_remat_policies_see_the_fused_residual():
  """An outer jax.checkpoint's policy sees the fused block's forward rule: `names` and
  `dots` can keep the in_proj output, `nothing` keeps nothing per token; without a
  checkpoint the in_proj output is the only per-token value kept besides h."""
  config = CONFIGS["g1"].replace(block_impl="fused")
  zxbcdt = (BATCH, SEQLEN, config.d_in_proj)
  policies = jax.checkpoint_policies
  assert [s for s, _ in per_token_residuals(config, None)] == [zxbcdt]
  assert per_token_residuals(config, policies.nothing_saveable) == []
  named = per_token_residuals(config, policies.save_only_these_names("mamba2_in_proj"))
  assert [s for s, _ in named] == [zxbcdt] and "mamba2_in_proj" in named[0][1], named
  dots = per_token_residuals(config, policies.dots_with_no_batch_dims_saveable)
  assert [s for s, _ in dots] == [zxbcdt] and "dot_general" in dots[0][1], dots
  # The autodiff block keeps many more per-token values (conv, SSD, norm intermediates).
  assert len(per_token_residuals(config.replace(block_impl="autodiff"), None)) >= 5
