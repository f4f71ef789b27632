"""Segment resets (`ssd(..., reset=)`) in the GPU kernels (`pallas`, `triton`) against the
float64 oracle, outputs and all gradients. Marker `gpu`: skipped without an NVIDIA GPU.

  JAX_PLATFORMS=cuda pytest -q -m gpu tests/gpu/test_ssd_segments_gpu.py
  python -m tests.gpu.test_ssd_segments_gpu      # timing: reset=None vs reset at 32K
(tests/conftest.py defaults JAX_PLATFORMS to cpu, so without it every test here skips.)

The kernels need power-of-2 P, N and chunk length (>= 16). The reference of a packed row is
the oracle on each segment alone (reset=None), as in tests/kernels/test_ssd_segments.py;
f32 tolerances allow tf32 matrix units (as tests/gpu/test_ssd_gpu.py).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import ssd
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents
from tests.kernels.test_ssd_segments import (assert_matches, oracle_run, segments_alone,
                                             vjp_runner)

TOL = {"float32": 1e-3, "bfloat16": 1e-2}
GRAD_TOL = {"float32": 3e-3, "bfloat16": 3e-2}
# One segment alone: (y and dx, ddt / dB / dC). Short segments have small dB, dC, d(dt),
# whose rounding (bf16 outputs, tf32 products) weighs more: the CPU sweep's bf16 worst was
# 6e-2 (test_ssd_segments.py).
SEG_TOL = {"float32": (2e-2, 1.5e-1), "bfloat16": (2e-2, 1.5e-1)}

# Chunk 32, T = 160 (edges at 32, 64, 96, 128). Row 0: resets mid-chunk (10), at an edge (32),
# length-1 segments (33, 34), three in one chunk, near the end; row 1: at t = 0, 64, 159.
PACKED = Case(batch=2, seqlen=160, n_heads=4, n_groups=2, head_dim=16, d_state=32,
              chunk_len=32, with_initial_state=True, D_per_channel=True)
RESET_STEPS = ((10, 32, 33, 34, 70, 127, 128), (0, 64, 159))
# Random resets, odd T, chunk 64, bf16 / f32.
RANDOM = {"bf16_chunk64": Case(batch=2, seqlen=203, n_heads=4, n_groups=1, head_dim=32,
                               d_state=32, chunk_len=64, dtype="bfloat16",
                               with_initial_state=True),
          "f32_chunk16": Case(batch=1, seqlen=77, n_heads=8, n_groups=4, head_dim=16,
                              d_state=16, chunk_len=16)}
SEEDS = {"bf16_chunk64": 21, "f32_chunk16": 22}


def _packed_reset():
  reset = np.zeros((PACKED.batch, PACKED.seqlen), bool)
  for b, steps in enumerate(RESET_STEPS):
    reset[b, list(steps)] = True
  return reset


def _run(impl, case, inputs, cot, reset):
  fn = lambda r, **i: ssd(**i, chunk_len=case.chunk_len, impl=impl, reset=r)
  return vjp_runner(fn)(inputs, cot, reset)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_row_equals_segments_alone(impl, dtype):
  case = Case(**{**PACKED.__dict__, "dtype": dtype})
  inputs = make_inputs(case, seed=31)
  cot = random_cotangents(case, seed=31)
  reset = _packed_reset()
  got = _run(impl, case, inputs, cot, reset)
  assert_matches(dtype, got, segments_alone(inputs, cot, reset), reset, tol=TOL[dtype],
                 gtol=GRAD_TOL[dtype], seg_tol=SEG_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "triton"])
@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_resets_match_oracle(impl, name):
  case = RANDOM[name]
  inputs = make_inputs(case, seed=SEEDS[name])
  cot = random_cotangents(case, seed=SEEDS[name])
  reset = np.random.default_rng(SEEDS[name]).random((case.batch, case.seqlen)) < 0.05
  reset[0, 0] = True
  got = _run(impl, case, inputs, cot, reset)
  assert_matches(case.dtype, got, oracle_run(inputs, cot, reset), reset, tol=TOL[case.dtype],
                 gtol=GRAD_TOL[case.dtype], seg_tol=SEG_TOL[case.dtype])


def timing(impl: str = "triton", seqlen: int = 32768, heads: int = 80, repeats: int = 7,
           inner: int = 5) -> None:
  """Median ms, forward and forward+backward, reset=None vs a reset every ~1.5K steps (at
  random steps: mid-chunk, so every masking path runs), bench/ssd.py's shapes."""
  from ma2mba_jax.bench.ssd import make_inputs as bench_inputs
  inputs = bench_inputs(seqlen, heads, 64, 128)
  rng = np.random.default_rng(0)
  reset = np.zeros((1, seqlen), bool)
  reset[0, rng.choice(seqlen, seqlen // 1536, replace=False)] = True
  reset = jnp.asarray(reset)

  def make(with_reset):
    fn = functools.partial(ssd, chunk_len=256, impl=impl)
    fwd = jax.jit(lambda r, **i: fn(**i, reset=r if with_reset else None))

    def loss(diff, rest, r):
      y, s = fn(**diff, **rest, reset=r if with_reset else None)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
    grad = jax.jit(jax.grad(loss))
    diff = {k: inputs[k] for k in ("x", "dt", "B", "C")}
    rest = {k: v for k, v in inputs.items() if k not in diff}
    return (lambda: fwd(reset, **inputs)), (lambda: grad(diff, rest, reset))

  def median_ms(call):
    jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(inner):
        out = call()
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(samples)

  print(f"{impl} T={seqlen} H={heads} P=64 N=128 chunk 256 bf16, {int(reset.sum())} resets, "
        f"{jax.devices()[0].device_kind}")
  rows = {}
  fns = {False: make(False), True: make(True)}
  for name, with_reset in (("reset=None", False), ("reset", True), ("reset=None again", False)):
    fwd, fwd_bwd = fns[with_reset]
    rows[name] = (median_ms(fwd), median_ms(fwd_bwd))
  print(f"{'':18s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
  for name, (f, fb) in rows.items():
    print(f"{name:18s} {f:8.3f} {fb:11.3f}")


if __name__ == "__main__":
  timing(*sys.argv[1:2])
