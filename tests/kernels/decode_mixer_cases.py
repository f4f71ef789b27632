"""Cases, inputs and the float64 oracle of kernels/decode.mixer_step (shared by the CPU test,
the GPU test and the tolerance sweep), and the check that the kernel's L2 prefetch changes
no output.

The oracle is the single-token Mamba-2 recurrence written out in numpy float64, with no
rounding to the compute dtype anywhere: conv over [state, input] + SiLU, softplus dt,
h = exp(dt A) h + dt x B^T, y = h C + D x, g = y * silu(z), per-head sums of g^2, g * w.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.decode import Dims, MixerParams, mixer_step
from ma2mba_jax.testing import rel_err


class Case(NamedTuple):
  batch: int = 2
  n_layers: int = 3
  layer: int = 1
  n_heads: int = 4
  head_dim: int = 16
  d_state: int = 16
  n_groups: int = 1
  d_conv: int = 4
  dtype: str = "float32"


CASES = {
    "g1_f32": Case(),
    "g2_f32": Case(n_heads=8, n_groups=2, layer=2),
    "g1_bf16": Case(dtype="bfloat16", layer=0),
    "g2_bf16_b1": Case(batch=1, n_heads=8, head_dim=32, d_state=32, n_groups=2,
                       dtype="bfloat16"),
}

# Worst relative error of tests/kernels/decode_mixer_sweep.py over seeds 0-19 and every case
# (CPU, 2026-11-26; xla and pallas interpret alike): float32 4.5e-7 (ss, g1_f32 seed 5),
# bfloat16 1.27e-2 (ss, g1_bf16 seed 6); the tolerances are 2x that, rounded up to 1, 2 or
# 5 x 10^k. The bf16 error is the rounding of the in_proj output, the conv output, y and
# g * w to bf16, which the oracle does not do. Called as the fused_reduce step does
# (errors(fused_reduce=True): the 1/rms from an f32 sum of squares; session 11, seeds 0-19,
# `--fused_reduce`): float32 6.8e-7 (ss, g2_f32 seed 16, xla), bfloat16 1.27e-2, so float32's
# tolerance became 2e-6.
TOLERANCES = {"float32": 2e-6, "bfloat16": 5e-2}


def dims_of_case(case: Case) -> Dims:
  return Dims(d_inner=case.n_heads * case.head_dim, n_heads=case.n_heads,
              head_dim=case.head_dim, d_state=case.d_state, n_groups=case.n_groups,
              d_conv=case.d_conv, dt_limit=(0.0, math.inf),
              compute_dtype=jnp.dtype(case.dtype))


def make_inputs(case: Case, seed: int) -> dict:
  """Random numpy f32 inputs of mixer_step (a state after some tokens, weights as a trained
  model's magnitudes)."""
  rng = np.random.default_rng(seed)
  e, h, p, n, g = (case.n_heads * case.head_dim, case.n_heads, case.head_dim, case.d_state,
                   case.n_groups)
  c = e + 2 * g * n
  f = np.float32
  return dict(
      raw=rng.normal(size=(case.batch, 2 * e + 2 * g * n + h)).astype(f),
      in_scale=rng.uniform(0.5, 2.0, case.batch).astype(f),
      params=MixerParams(conv_weight=rng.normal(0, 0.5, (case.d_conv, c)).astype(f),
                         conv_bias=rng.normal(0, 0.1, c).astype(f),
                         dt_bias=rng.normal(-2.0, 1.0, h).astype(f),
                         A_log=rng.uniform(0.0, 2.5, h).astype(f),
                         D=rng.normal(1.0, 0.3, h).astype(f),
                         norm_weight=rng.normal(1.0, 0.2, e).astype(f)),
      conv=rng.normal(size=(case.n_layers, case.batch, c, case.d_conv - 1)).astype(f),
      ssm=rng.normal(size=(case.n_layers, case.batch, h, p, n)).astype(f))


def _silu(v):
  return v / (1.0 + np.exp(-v))


def oracle(case: Case, inputs: dict) -> dict:
  """float64: yw [B, E], ss [B, H], the layer's conv state [B, C, K-1], ssm stack."""
  d = {k: v for k, v in inputs.items() if k != "params"}
  prm = {k: np.asarray(v, np.float64) for k, v in inputs["params"]._asdict().items()}
  e, h, p, n, g = (case.n_heads * case.head_dim, case.n_heads, case.head_dim, case.d_state,
                   case.n_groups)
  zxbcdt = np.asarray(d["raw"], np.float64) * np.asarray(d["in_scale"], np.float64)[:, None]
  z, xbc, dt = zxbcdt[:, :e], zxbcdt[:, e:2 * e + 2 * g * n], zxbcdt[:, 2 * e + 2 * g * n:]
  conv_state = np.asarray(d["conv"][case.layer], np.float64)          # [B, C, K-1]
  window = np.concatenate([conv_state, xbc[:, :, None]], axis=2)      # [B, C, K]
  out = prm["conv_bias"] + np.einsum("bck,kc->bc", window, prm["conv_weight"])
  xbc = _silu(out)
  x = xbc[:, :e].reshape(-1, h, p)
  bmat = np.repeat(xbc[:, e:e + g * n].reshape(-1, g, n), h // g, axis=1)   # [B, H, N]
  cmat = np.repeat(xbc[:, e + g * n:].reshape(-1, g, n), h // g, axis=1)
  dt = np.logaddexp(dt + prm["dt_bias"], 0.0)                         # [B, H]
  a = -np.exp(prm["A_log"])
  state = np.asarray(d["ssm"][case.layer], np.float64)
  state = (np.exp(dt * a)[:, :, None, None] * state
           + (dt[:, :, None] * x)[..., None] * bmat[:, :, None, :])
  y = np.einsum("bhpn,bhn->bhp", state, cmat) + prm["D"][:, None] * x
  gated = y * _silu(z.reshape(-1, h, p))
  ssm = np.asarray(d["ssm"], np.float64).copy()
  ssm[case.layer] = state
  return dict(yw=gated.reshape(-1, e) * prm["norm_weight"], ss=np.sum(gated ** 2, axis=-1),
              conv=window[:, :, 1:], ssm=ssm)


NORM_WIDTH, NORM_EPS = 48, 1e-5   # in_norm's D and eps in the tests


def errors(case: Case, seed: int, impl: str, interpret: bool | None = None,
           split: int | None = None, fused_reduce: bool = False) -> dict:
  """Relative error of each output of mixer_step(impl) against the oracle. split: the
  pallas kernel's programs per head (its ss: a head's `split` partial sums, added here).
  fused_reduce: as the fused_reduce decode step calls it: the 1/rms from raw's extra
  column (in_norm; the column holds the sum of squares that gives the case's in_scale)
  and the conv stack updated in place (conv_in_place, with the previous layer's B/C taps
  as bc_prev when the layer is not the first); every entry of the stack is checked."""
  inputs = make_inputs(case, seed)
  j = {k: (jnp.asarray(v) if k != "params" else MixerParams(*map(jnp.asarray, v)))
       for k, v in inputs.items()}
  kwargs = {} if split is None else {"split": split}
  e = case.n_heads * case.head_dim
  rng = np.random.default_rng(seed + 1000)
  bc_prev = None
  if fused_reduce:
    squares = NORM_WIDTH * (inputs["in_scale"].astype(np.float64) ** -2 - NORM_EPS)
    j["raw"] = jnp.concatenate([j["raw"], jnp.asarray(squares, jnp.float32)[:, None]], 1)
    if case.layer > 0:
      bc_prev = rng.normal(size=inputs["conv"].shape[1:]).astype(np.float32)[:, e:]
      kwargs["bc_prev"] = jnp.asarray(bc_prev)
    kwargs.update(in_norm=(NORM_WIDTH, NORM_EPS), conv_in_place=True)
  yw, ss, conv, ssm, *bc = mixer_step(
      jnp.int32(case.layer), j["raw"], j["in_scale"], j["params"], j["conv"], j["ssm"],
      dims=dims_of_case(case), impl=impl, interpret=interpret, **kwargs)
  ss = ss.reshape(ss.shape[0], case.n_heads, -1).sum(-1)                     # [B, H]
  ref = oracle(case, inputs)
  others = [i for i in range(case.n_layers) if i != case.layer]
  # The other layers' states pass through untouched (in place in the pallas backend).
  np.testing.assert_array_equal(np.asarray(ssm)[others], inputs["ssm"][others])
  if fused_reduce:
    # The stack: the layer's x taps new, its B/C taps old (returned as bc), the previous
    # layer's B/C taps bc_prev, every other entry untouched.
    conv, stack = np.asarray(conv), inputs["conv"].copy()
    if bc_prev is not None:
      stack[case.layer - 1, :, e:] = bc_prev
    stack[case.layer, :, :e] = conv[case.layer, :, :e]
    np.testing.assert_array_equal(conv, stack)
    conv = np.concatenate([conv[case.layer, :, :e], np.asarray(bc[0])], axis=1)
  return {"yw": rel_err(yw, ref["yw"]), "ss": rel_err(ss, ref["ss"]),
          "conv": rel_err(conv, ref["conv"]),
          "ssm": rel_err(ssm[case.layer], ref["ssm"][case.layer])}


def prefetch_unchanged(case: Case, rows: int, in_place: bool, interpret: bool,
                       shape: tuple[int, int]) -> None:
  """mixer_step(impl="pallas") with `prefetch` (rows of a bf16 matrix of `shape` read into
  L2 by extra programs) returns exactly what it returns without; prefetch_rows=5 (not a
  multiple of pallas.PREFETCH_ROWS_PER_PROGRAM) is refused."""
  inputs = make_inputs(case, seed=3)
  params = MixerParams(*map(jnp.asarray, inputs["params"]))
  matrix = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)

  def run(**kwargs):
    return mixer_step(jnp.int32(case.layer), jnp.asarray(inputs["raw"]),
                      jnp.asarray(inputs["in_scale"]), params, jnp.asarray(inputs["conv"]),
                      jnp.asarray(inputs["ssm"]), dims=dims_of_case(case), impl="pallas",
                      interpret=interpret, conv_in_place=in_place, **kwargs)

  plain = run()
  fetched = run(prefetch=matrix, prefetch_rows=rows)
  assert len(fetched) == len(plain)
  for a, b in zip(plain, fetched):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(run(prefetch=matrix, prefetch_rows=0)[0]),
                                np.asarray(plain[0]))
  with pytest.raises(ValueError, match="prefetch_rows=5"):
    run(prefetch=matrix, prefetch_rows=5)
