"""Every SSD backend on the GPU against the float64 oracle (outputs and all gradients).

Marker `gpu`: skipped without an NVIDIA GPU; run through the device tool, e.g.
  pytest -q -m gpu tests/gpu/test_ssd_gpu.py
The GPU kernels need power-of-2 head dim, state size and chunk length (>= 16), so the cases
here use those; odd T, several groups and initial states are covered. f32 tolerances allow
tf32 matrix units.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import pytest

from ma2mba_jax.kernels.ssd import resolve_impl, ssd
from tests.kernels.ssd_cases import (Case, make_inputs, oracle_outputs_and_grads,
                                     outputs_and_grads, random_cotangents, rel_err)

pytestmark = pytest.mark.gpu

TOL = {"float32": 1e-3, "bfloat16": 1e-2}
GRAD_TOL = {"float32": 3e-3, "bfloat16": 2e-2}

CASES = {
    "f32_odd_T": Case(seqlen=203, head_dim=16, d_state=16, chunk_len=32),
    "bf16_groups2_init": Case(seqlen=150, n_heads=4, n_groups=2, head_dim=32, d_state=32,
                              chunk_len=64, dtype="bfloat16", with_initial_state=True),
    "bf16_chunk256_noD": Case(seqlen=600, batch=1, n_heads=4, head_dim=64, d_state=128,
                              chunk_len=256, dtype="bfloat16", with_D=False),
    "f32_groups4_init_Dp": Case(seqlen=77, n_heads=8, n_groups=4, head_dim=16, d_state=32,
                                chunk_len=16, with_initial_state=True, D_per_channel=True),
}


@pytest.mark.parametrize("impl", ["pallas", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_matches_oracle(impl, name):
  case = CASES[name]
  # zlib.crc32 is stable across processes (hash() of strings is salted per process).
  inputs = make_inputs(case, seed=zlib.crc32(f"{impl}/{name}".encode()) % 1000)
  cot = random_cotangents(case, seed=3)
  fn = functools.partial(ssd, chunk_len=case.chunk_len, impl=impl)
  (y, state), grads = outputs_and_grads(fn, inputs, cot)
  (y_ref, state_ref), grads_ref = oracle_outputs_and_grads(inputs, cot)
  tol, gtol = TOL[case.dtype], GRAD_TOL[case.dtype]
  assert y.dtype == inputs["x"].dtype and state.dtype == jnp.float32
  assert rel_err(y, y_ref) < tol, f"y: {rel_err(y, y_ref):.2e}"
  assert rel_err(state, state_ref) < tol, f"final_state: {rel_err(state, state_ref):.2e}"
  for k, g_ref in grads_ref.items():
    assert rel_err(grads[k], g_ref) < gtol, f"d{k}: {rel_err(grads[k], g_ref):.2e}"


def test_auto_picks_a_kernel_backend_on_gpu():
  assert jax.default_backend() == "gpu"
  assert resolve_impl("auto") in ("pallas", "triton")
