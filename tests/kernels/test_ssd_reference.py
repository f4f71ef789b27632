"""The pure-JAX chunked SSD (impl="xla") against the float64 sequential oracle."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import ssd
from tests.kernels.ssd_cases import (Case, check_against_oracle, tolerance,
                                     make_inputs, outputs_and_grads, random_cotangents, rel_err)

xla_ssd = functools.partial(ssd, impl="xla")

CASES = {
    "f32": Case(),
    "bf16": Case(dtype="bfloat16"),
    "groups2": Case(n_heads=4, n_groups=2),
    "groups4_bf16": Case(n_heads=8, n_groups=4, dtype="bfloat16"),
    "init_state": Case(with_initial_state=True),
    "init_state_bf16_noD": Case(with_initial_state=True, with_D=False, dtype="bfloat16"),
    "D_per_channel": Case(D_per_channel=True),
    "no_D": Case(with_D=False),
    "chunk4": Case(chunk_len=4, seqlen=30),
    "chunk16_multiple": Case(chunk_len=16, seqlen=64),
    "chunk256_short": Case(chunk_len=256, seqlen=45, batch=1),
    "chunk64_long": Case(chunk_len=64, seqlen=300, batch=1, n_heads=2, with_initial_state=True),
    "T_less_than_chunk": Case(chunk_len=32, seqlen=5),
}


# A fixed seed per case (its index; never hash() of the name, which Python salts per
# process). tolerance_sweep.py checks seeds 0..19 of every case against the tolerances.
SEEDS = {name: i for i, name in enumerate(sorted(CASES))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle(name):
  check_against_oracle(xla_ssd, CASES[name], seed=SEEDS[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("split", [8, 13])
def test_two_pieces_compose(dtype, split):
  """Running T in two pieces, carrying final_state, equals running it whole, with gradients."""
  case = Case(seqlen=40, dtype=dtype, with_initial_state=True)
  inputs = make_inputs(case, seed=split)
  cot = random_cotangents(case, seed=split)

  def two_pieces(x, dt, A, B, C, D, dt_bias, initial_state):
    first = lambda a: a[:, :split]
    rest = lambda a: a[:, split:]
    y1, s1 = ssd(first(x), first(dt), A, first(B), first(C), D=D, dt_bias=dt_bias,
                 initial_state=initial_state, chunk_len=case.chunk_len, impl="xla")
    y2, s2 = ssd(rest(x), rest(dt), A, rest(B), rest(C), D=D, dt_bias=dt_bias,
                 initial_state=s1, chunk_len=case.chunk_len, impl="xla")
    return jnp.concatenate([y1, y2], axis=1), s2

  whole = functools.partial(xla_ssd, chunk_len=case.chunk_len)
  (y, s), g = outputs_and_grads(two_pieces, inputs, cot)
  (y_ref, s_ref), g_ref = outputs_and_grads(whole, inputs, cot)
  # Same precision on both sides: only f32 reassociation differs (bf16 adds output rounding).
  tol = 1e-5 if dtype == "float32" else 1e-2
  assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
  for k in g_ref:
    assert rel_err(g[k], g_ref[k]) < (1e-5 if dtype == "float32" else 2e-2), k


def test_chunk_len_does_not_change_result():
  inputs = make_inputs(Case(seqlen=50), seed=3)
  ys = [np.asarray(xla_ssd(**inputs, chunk_len=q)[0]) for q in (1, 4, 7, 16, 64)]
  for y in ys[1:]:
    assert rel_err(y, ys[0]) < 1e-5


def test_stable_for_long_sequences_and_large_dt():
  """Huge dt and many steps: decays underflow to 0, never overflow to inf or NaN."""
  case = Case(seqlen=2048, chunk_len=256, batch=1, n_heads=2, head_dim=4, d_state=8)
  inputs = make_inputs(case, seed=5)
  inputs["dt"] = inputs["dt"] * 30.0 + 20.0        # softplus(...) up to ~100
  inputs["A"] = inputs["A"] * 50.0                  # dt * A down to ~ -1e4 per step
  cot = random_cotangents(case, seed=5)
  (y, s), grads = outputs_and_grads(xla_ssd, inputs, cot)
  for a in [y, s, *grads.values()]:
    assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))


def test_dt_limit_and_no_softplus_match_oracle():
  case = Case()
  check_against_oracle(xla_ssd, case, seed=11, dt_limit=(0.05, 0.6))
  inputs = make_inputs(case, seed=12)
  inputs["dt"] = jnp.abs(inputs["dt"])
  from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
  with jax.enable_x64(True):
    ref = ssd_oracle(**{k: np.asarray(v, np.float64) for k, v in inputs.items()},
                     dt_softplus=False)[0]
  y = xla_ssd(**inputs, dt_softplus=False)[0]
  assert rel_err(y, ref) < tolerance("float32", "y")


def test_jit_and_eval_shape_full_size():
  """The 2.7B shapes trace without allocating (eval_shape)."""
  b, t, h, p, n = 1, 8192, 80, 64, 128
  x = jax.ShapeDtypeStruct((b, t, h, p), jnp.bfloat16)
  dt = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  A = jax.ShapeDtypeStruct((h,), jnp.float32)
  B = jax.ShapeDtypeStruct((b, t, 1, n), jnp.bfloat16)
  y, s = jax.eval_shape(functools.partial(xla_ssd, chunk_len=256), x, dt, A, B, B)
  assert y.shape == (b, t, h, p) and y.dtype == jnp.bfloat16
  assert s.shape == (b, h, p, n) and s.dtype == jnp.float32


class TestBadCalls:
  def _inputs(self):
    return make_inputs(Case(n_heads=4, n_groups=2), seed=0)

  def test_mismatched_dt(self):
    inp = self._inputs()
    inp["dt"] = inp["dt"][:, :-1]
    with pytest.raises(ValueError, match="dt must be"):
      xla_ssd(**inp)

  def test_groups_not_dividing_heads(self):
    inp = self._inputs()
    inp["B"] = jnp.concatenate([inp["B"], inp["B"][:, :, :1]], axis=2)
    inp["C"] = inp["B"]
    with pytest.raises(ValueError, match="G=3 must divide the number of heads H=4"):
      xla_ssd(**inp)

  def test_B_C_mismatch(self):
    inp = self._inputs()
    inp["C"] = inp["C"][..., :-1]
    with pytest.raises(ValueError, match="B and C must have the same shape"):
      xla_ssd(**inp)

  def test_non_float_dtype(self):
    inp = self._inputs()
    inp["x"] = inp["x"].astype(jnp.int32)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
      xla_ssd(**inp)

  def test_bad_initial_state_and_D(self):
    inp = self._inputs()
    with pytest.raises(ValueError, match="initial_state must be"):
      xla_ssd(**inp, initial_state=jnp.zeros((1, 2, 3, 4)))
    inp["D"] = jnp.ones((5,))
    with pytest.raises(ValueError, match="D must be"):
      xla_ssd(**inp)

  def test_bad_impl_and_chunk(self):
    inp = self._inputs()
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
      ssd(**inp, impl="cuda")
    with pytest.raises(ValueError, match="chunk_len must be a positive int"):
      xla_ssd(**inp, chunk_len=0)
