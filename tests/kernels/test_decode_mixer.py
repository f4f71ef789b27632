"""kernels/decode.mixer_step (the middle of a layer's single-token step) against its float64
oracle: the plain-JAX backend and the Pallas kernel in interpret mode, several groups,
float32 and bfloat16 compute; the other layers' states pass through untouched. The GPU run
of the kernel is tests/gpu/test_decode_gpu.py; tolerances: decode_mixer_cases.TOLERANCES."""

import jax.numpy as jnp
import pytest

from ma2mba_jax.kernels.decode import resolve_impl
from tests.kernels.decode_mixer_cases import (CASES, TOLERANCES, dims_of_case, errors,
                                              prefetch_unchanged)


# Every case with the kernel; the plain-JAX backend on two (it is also the fused decode
# step's CPU path, tests/infer/test_fused_decode.py).
@pytest.mark.parametrize("name,impl", [*((name, "pallas") for name in sorted(CASES)),
                                       ("g2_f32", "xla"), ("g1_bf16", "xla")])
def test_mixer_step_matches_the_float64_oracle(name, impl):
  case = CASES[name]
  errs = errors(case, seed=7, impl=impl, interpret=True if impl == "pallas" else None)
  tol = TOLERANCES[case.dtype]
  assert all(err < tol for err in errs.values()), (name, impl, errs)


@pytest.mark.parametrize("name,split", [("g1_f32", 2), ("g2_bf16_b1", 4), ("g2_f32", 16)])
def test_mixer_kernel_split_over_programs_matches_the_oracle(name, split):
  # split programs per head, each P / split of its rows: a head's ss in `split` parts.
  case = CASES[name]
  errs = errors(case, seed=11, impl="pallas", interpret=True, split=split)
  assert all(err < TOLERANCES[case.dtype] for err in errs.values()), (name, split, errs)


@pytest.mark.parametrize("name,impl", [("g1_f32", "pallas"), ("g2_f32", "pallas"),
                                       ("g1_bf16", "pallas"), ("g2_bf16_b1", "pallas"),
                                       ("g2_f32", "xla")])
def test_mixer_step_with_the_norm_column_and_in_place_conv_matches_the_oracle(name, impl):
  # The fused_reduce step's call: 1/rms from raw's extra column, conv stack in place.
  case = CASES[name]
  errs = errors(case, seed=5, impl=impl, interpret=True if impl == "pallas" else None,
                fused_reduce=True)
  assert all(err < TOLERANCES[case.dtype] for err in errs.values()), (name, impl, errs)


@pytest.mark.parametrize("name,rows,in_place", [("g1_f32", 8, False), ("g2_bf16_b1", 16, True),
                                                ("g2_f32", 4, True)])
def test_mixer_kernel_prefetch_leaves_every_output_unchanged(name, rows, in_place):
  # The extra programs that read another matrix into L2 write nothing the caller sees.
  prefetch_unchanged(CASES[name], rows, in_place, interpret=True, shape=(24, 64))


def test_impl_resolution():
  dims = dims_of_case(CASES["g1_f32"])
  assert resolve_impl("auto", dims, platform="gpu") == "pallas"
  assert resolve_impl("auto", dims, platform="cpu") == "xla"
  odd = dims._replace(head_dim=24)
  assert resolve_impl("auto", odd, platform="gpu") == "xla"
  with pytest.raises(ValueError, match="head_dim=24"):
    resolve_impl("pallas", odd)
  with pytest.raises(ValueError, match="impl must be one of"):
    resolve_impl("triton", dims)
  assert dims.compute_dtype == jnp.float32

