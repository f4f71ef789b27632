"""The Pallas SSD backend in interpret mode (CPU) against the float64 sequential oracle.

Same cases as test_ssd_reference.py, outputs and the gradients of every input. Each case
runs with small blocks so that every tiling path is exercised: several row / column tiles
per chunk (the tiles above the diagonal too), several head-dim blocks in chunk_state,
several state blocks in state_pass, several row blocks and head blocks in the
head-summing kernels. More cases run the default blocks and f32 storage. To stay fast on a small CPU, outputs and gradients come from one
compiled function (jax.vjp) built without LLVM optimisation; the numbers are the same.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from tests.kernels.ssd_cases import Case, assert_close, make_inputs, random_cotangents
from tests.kernels.test_ssd_reference import CASES, SEEDS

SMALL_BLOCKS = dict(block_l=4, block_p=4, block_r=4, block_s=32, contract_heads=2,
                    dcb_heads=1)
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _outputs_and_grads(fn, inputs, cotangents):
  """(y, final_state) and the gradient of sum(y*gy) + sum(state*gs) for every input."""
  def run(inp):
    (y, state), vjp = jax.vjp(lambda i: fn(**i), inp)
    (grads,) = vjp((cotangents[0].astype(y.dtype), cotangents[1].astype(state.dtype)))
    return y, state, grads
  compiled = jax.jit(run).lower(inputs).compile(compiler_options=_FAST_COMPILE)
  return compiled(inputs)


def _check(case: Case, seed: int, **options):
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  pallas = functools.partial(ssd, chunk_len=case.chunk_len, impl="pallas", interpret=True,
                             **options)
  y, state, grads = _outputs_and_grads(pallas, inputs, cot)
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
    y_ref, state_ref, grads_ref = _outputs_and_grads(ssd_oracle, inputs64, cot64)

  assert y.dtype == inputs["x"].dtype and y.shape == y_ref.shape
  assert state.dtype == jnp.float32 and state.shape == state_ref.shape
  assert set(grads) == set(inputs)
  for name, g_ref in grads_ref.items():
    assert grads[name].shape == g_ref.shape and grads[name].dtype == inputs[name].dtype
  assert_close(case.dtype, y, state, grads, y_ref, state_ref, grads_ref)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle(name):
  _check(CASES[name], seed=SEEDS[name], **SMALL_BLOCKS)


# name -> (case, options): more configurations than the small-block tiling above.
EXTRA_CASES = {
    # Default blocks (64-step tiles: four per 256-step chunk, 32-row state blocks).
    "default_blocks": (Case(chunk_len=256, seqlen=300, batch=1, n_heads=2, head_dim=64,
                            d_state=16, with_initial_state=True, dtype="bfloat16"), {}),
    # state_f32 / cb_f32 keep the saved states and CB in f32 for bf16 inputs.
    "f32_storage": (Case(dtype="bfloat16", with_initial_state=True, n_heads=4, n_groups=2),
                    dict(state_f32=True, cb_f32=True, **SMALL_BLOCKS)),
    # The configuration measured first on the H100 (fused state scan, all heads of a group
    # per program, f32 states and CB) stays reachable through options.
    "version1": (Case(dtype="bfloat16", seqlen=30, chunk_len=8, with_initial_state=True),
                 dict(state_impl="fused", contract_heads=80, dcb_heads=80, state_f32=True,
                      cb_f32=True, block_l=4, block_p=4, block_r=4)),
}


@pytest.mark.parametrize("name,seed", [("default_blocks", 7), ("f32_storage", 8),
                                       ("version1", 9)])
def test_extra_configurations_match_oracle(name, seed):
  case, options = EXTRA_CASES[name]
  _check(case, seed=seed, **options)


def test_bad_state_impl():
  inputs = make_inputs(Case(), seed=0)
  with pytest.raises(ValueError, match="state_impl='serial' must be 'split' or 'fused'"):
    ssd(**inputs, chunk_len=8, impl="pallas", interpret=True, state_impl="serial")


def test_registered_and_picked_only_by_name_on_cpu():
  from ma2mba_jax.kernels.ssd import available_backends, resolve_impl
  assert {"pallas", "triton"} <= set(available_backends())
  assert resolve_impl("auto", "cpu") == "xla"
  assert resolve_impl("pallas") == "pallas"


def test_gpu_shape_check_names_the_problem():
  """Off the interpreter the kernels need power-of-2 sizes; the error says which."""
  inputs = make_inputs(Case(head_dim=24, chunk_len=32, seqlen=40), seed=0)
  with pytest.raises(ValueError, match="head_dim P=24 must be a power of 2"):
    ssd(**inputs, chunk_len=32, impl="pallas", interpret=False)


def test_tuned_options_reach_the_kernels_and_yield_to_the_caller(monkeypatch):
  """The backend's TUNED_OPTIONS (4 warps for chunk_state, no pipelining in chunk_scan_fwd)
  reach the kernels; the backward's chunk_scan_bwd_dx keeps num_stages; an option the caller
  passes wins over the tuned one."""
  from ma2mba_jax.kernels.ssd import pallas as backend
  seen: dict[str, list[dict]] = {}
  for name in ("chunk_state", "chunk_scan_fwd", "chunk_scan_bwd_dx"):
    original = getattr(backend.kernels, name)

    def record(*args, _name=name, _original=original, **kwargs):
      seen.setdefault(_name, []).append(kwargs)
      return _original(*args, **kwargs)
    monkeypatch.setattr(backend.kernels, name, record)
  assert backend.TUNED_OPTIONS == {"warps_state": 4, "stages_chunk_fwd": 1}
  inputs = make_inputs(Case(), seed=0)

  def loss(x, **options):
    y, state = ssd(**dict(inputs, x=x), chunk_len=8, impl="pallas", interpret=True, **options)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  jax.grad(loss)(inputs["x"])
  assert seen["chunk_state"][-1]["num_warps"] == 4
  assert seen["chunk_scan_fwd"][-1]["num_stages"] == 1
  assert seen["chunk_scan_bwd_dx"][-1]["num_stages"] == 2
  jax.grad(functools.partial(loss, warps_state=8, stages_chunk_fwd=3))(inputs["x"])
  assert seen["chunk_state"][-1]["num_warps"] == 8
  assert seen["chunk_scan_fwd"][-1]["num_stages"] == 3
