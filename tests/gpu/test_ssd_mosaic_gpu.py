"""The `mosaic_gpu` SSD backend (Pallas, Mosaic GPU lowering; Hopper) against the float64
sequential oracle on the GPU: outputs and the gradients of every input.

Marker `gpu`: skipped without an NVIDIA GPU (CI has none; there the same kernels run in
the Mosaic GPU interpreter, tests/kernels/test_ssd_mosaic_gpu.py). Run through the device
tool:
  JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/gpu/test_ssd_mosaic_gpu.py
The kernels need chunk length, head dim and state size multiples of 64; the cases cover
T not a multiple of the chunk, several groups, an initial state, D per channel, no D,
f32 inputs (matmuls in bf16) and segment resets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents, rel_err

pytestmark = pytest.mark.gpu

# ‖out − ref‖ / ‖ref‖ allowed against the f64 oracle. From
# `python -m tests.gpu.ssd_mosaic_gpu_sweep` (H100, jax 0.11.2, 2026-11-26, seeds 0..19 of
# every case in CASES, at commit 4fff035; later kernel commits changed only how tiles are
# copied, not the arithmetic): the worst error seen, times 2, rounded up to 1, 2 or 5 x
# 10^k. f32 inputs run bf16 matmul operands (f32 accumulation), so both dtypes land near
# bf16 rounding. dD sums dy * x in XLA in f32 (no kernel). Worst seen (case, seed):
TOLERANCES = {
    "float32": {
        "y": 1e-2,               # 3.2e-03 f32_q128_noD (18)
        "final_state": 1e-2,     # 3.4e-03 f32_q128_noD (5)
        "dx": 1e-2,              # 3.0e-03 f32_q128_noD (16)
        "dB": 1e-2,              # 2.7e-03 f32_q128_noD (11)
        "dC": 1e-2,              # 2.7e-03 f32_q128_noD (19)
        "ddt": 1e-2,             # 3.9e-03 f32_q128_noD (3)
        "dinitial_state": 1e-2,  # 3.0e-03 f32_q128_noD (1)
        "dA": 1e-1,              # 2.7e-02 f32_q128_noD (2)
        "ddt_bias": 5e-2,        # 1.5e-02 f32_q128_noD (0)
    },
    "bfloat16": {
        "y": 1e-2,               # 3.4e-03 bf16_reset (18)
        "final_state": 5e-3,     # 1.8e-03 bf16_reset (11)
        "dx": 1e-2,              # 3.3e-03 bf16_reset (13)
        "dB": 1e-2,              # 2.7e-03 bf16_reset (8)
        "dC": 1e-2,              # 2.7e-03 bf16_reset (9)
        "ddt": 1e-2,             # 3.4e-03 bf16_reset (4)
        "dinitial_state": 1e-2,  # 2.6e-03 bf16_reset (12)
        "dA": 5e-2,              # 2.1e-02 bf16_reset (7)
        # XLA on the GPU keeps dy in f32 for dD (it drops the bf16 round trip of the
        # cotangent); the CPU test's interpreter run sees 2.1e-3 for the same sum.
        "dD": 5e-6,              # 1.3e-06 bf16_reset (8)
        "ddt_bias": 5e-2,        # 1.6e-02 bf16_reset (17)
    },
}

CASES = {
    # The released layer's tile shapes (Q=256, P=64, N=128), T = 600 (3 chunks, padded).
    "bf16_q256": Case(batch=1, seqlen=600, n_heads=4, head_dim=64, d_state=128,
                      chunk_len=256, dtype="bfloat16"),
    # Two groups of two heads, batch 2, an initial state, D per channel, Q = 64.
    "bf16_groups2_init_Dp": Case(batch=2, seqlen=150, n_heads=4, n_groups=2, head_dim=64,
                                 d_state=64, chunk_len=64, dtype="bfloat16",
                                 with_initial_state=True, D_per_channel=True),
    # f32 inputs, no D, an initial state, Q = 128.
    "f32_q128_noD": Case(batch=1, seqlen=333, n_heads=2, head_dim=64, d_state=64,
                         chunk_len=128, with_D=False, with_initial_state=True),
    # Packed segments: resets inside chunks and on a chunk boundary (see RESETS).
    "bf16_reset": Case(batch=1, seqlen=200, n_heads=2, head_dim=64, d_state=64, chunk_len=64,
                       dtype="bfloat16", with_initial_state=True),
}
RESETS = {"bf16_reset": ((5, 64, 100),)}
SEEDS = {"bf16_q256": 3, "bf16_groups2_init_Dp": 4, "f32_q128_noD": 5, "bf16_reset": 6}


def reset_mask(case: Case, starts) -> np.ndarray | None:
  """[B, T] bool, True at `starts` ([B] tuples of positions); None for no reset."""
  if starts is None:
    return None
  reset = np.zeros((case.batch, case.seqlen), bool)
  for row, positions in enumerate(starts):
    reset[row, list(positions)] = True
  return reset


def _runner(fn):
  def run(inp, cotangents):
    (y, state), vjp = jax.vjp(lambda i: fn(**i), inp)
    (grads,) = vjp((cotangents[0].astype(y.dtype), cotangents[1].astype(state.dtype)))
    return y, state, grads
  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _runners(name: str):
  case = CASES[name]
  reset = reset_mask(case, RESETS.get(name))
  kernel = functools.partial(ssd, chunk_len=case.chunk_len, impl="mosaic_gpu",
                             reset=None if reset is None else jnp.asarray(reset))
  return _runner(kernel), _runner(functools.partial(ssd_oracle, reset=reset))


def errors_against_oracle(name: str, seed: int) -> dict[str, float]:
  """Rel. error of y, final_state and every input's gradient of impl="mosaic_gpu" against
  the f64 oracle on the same (rounded) inputs. Also used by the tolerance sweep."""
  case = CASES[name]
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  kernel, oracle = _runners(name)
  y, state, grads = kernel(inputs, cot)
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
    y_ref, state_ref, grads_ref = oracle(inputs64, cot64)
  assert y.dtype == inputs["x"].dtype and y.shape == y_ref.shape
  assert state.dtype == jnp.float32 and state.shape == state_ref.shape
  for k, g in grads.items():
    assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
  errs = {"y": rel_err(y, y_ref), "final_state": rel_err(state, state_ref)}
  errs.update({f"d{k}": rel_err(grads[k], g) for k, g in grads_ref.items()})
  return errs


@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_gpu_matches_oracle(name):
  tol = TOLERANCES[CASES[name].dtype]
  errs = errors_against_oracle(name, SEEDS[name])
  bad = {k: f"{v:.2e} > {tol[k]:.0e}" for k, v in errs.items() if not v < tol[k]}
  assert not bad, bad
