"""Shared SSD test inputs and comparison helpers (used by every backend's tests)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ma2mba_jax.kernels.ssd.oracle import ssd_oracle

# ‖out − ref‖ / ‖ref‖ allowed against the f64 oracle, per input dtype. bf16 inputs are
# rounded before the oracle sees them, so the error left is f32 accumulation plus the bf16
# rounding of the output (and of the gradients, which come back in the inputs' dtypes).
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  seqlen: int = 37
  n_heads: int = 4
  head_dim: int = 8
  n_groups: int = 1
  d_state: int = 16
  chunk_len: int = 8
  dtype: str = "float32"
  with_D: bool = True
  with_initial_state: bool = False
  D_per_channel: bool = False


def make_inputs(case: Case, seed: int):
  """Fresh random inputs (never zeros) for `case`, in the case's dtype."""
  keys = jax.random.split(jax.random.key(seed), 8)
  b, t, h, p, g, n = (case.batch, case.seqlen, case.n_heads, case.head_dim, case.n_groups,
                      case.d_state)
  dtype = jnp.dtype(case.dtype)
  inputs = dict(
      x=jax.random.normal(keys[0], (b, t, h, p)).astype(dtype),
      dt=jax.random.normal(keys[1], (b, t, h)) - 1.0,   # raw; softplus -> about 0.1..1.5
      A=-jnp.exp(jax.random.uniform(keys[2], (h,), minval=-1.0, maxval=1.0)),
      B=jax.random.normal(keys[3], (b, t, g, n)).astype(dtype),
      C=jax.random.normal(keys[4], (b, t, g, n)).astype(dtype),
      dt_bias=jax.random.uniform(keys[5], (h,), minval=-2.0, maxval=0.5),
  )
  if case.with_D:
    inputs["D"] = jax.random.normal(keys[6], (h, p) if case.D_per_channel else (h,))
  if case.with_initial_state:
    inputs["initial_state"] = jax.random.normal(keys[7], (b, h, p, n))
  return inputs


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert np.all(np.isfinite(out)), "output has NaN or inf"
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _loss_fn(fn, cotangents):
  """sum(y * gy) + sum(final_state * gs): a scalar whose gradient exercises both outputs."""
  def loss(inputs):
    y, state = fn(**inputs)
    return (jnp.sum(y.astype(jnp.float32) * cotangents[0])
            + jnp.sum(state.astype(jnp.float32) * cotangents[1]))
  return loss


def oracle_outputs_and_grads(inputs, cotangents, **options):
  """f64 oracle outputs and gradients of every input, on the same (rounded) inputs."""
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cotangents)
    def loss(inp):
      y, state = ssd_oracle(**inp, **options)
      return jnp.sum(y * cot64[0]) + jnp.sum(state * cot64[1])
    y, state = jax.jit(functools.partial(ssd_oracle, **options))(**inputs64)
    grads = jax.jit(jax.grad(loss))(inputs64)
    return (np.asarray(y), np.asarray(state)), {k: np.asarray(v) for k, v in grads.items()}


def outputs_and_grads(fn, inputs, cotangents):
  y, state = jax.jit(fn)(**inputs)
  grads = jax.jit(jax.grad(_loss_fn(fn, cotangents)))(inputs)
  return (y, state), grads


def random_cotangents(case: Case, seed: int):
  k1, k2 = jax.random.split(jax.random.key(seed + 1000))
  return (jax.random.normal(k1, (case.batch, case.seqlen, case.n_heads, case.head_dim)),
          jax.random.normal(k2, (case.batch, case.n_heads, case.head_dim, case.d_state)))


def check_against_oracle(fn, case: Case, seed: int, **options) -> None:
  """Asserts that `fn` (ssd's signature) matches the oracle in outputs and all gradients.

  `options` (dt_softplus, dt_limit) are passed to both `fn` and the oracle.
  """
  fn = functools.partial(fn, **options)
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  (y, state), grads = outputs_and_grads(fn, inputs, cot)
  (y_ref, state_ref), grads_ref = oracle_outputs_and_grads(inputs, cot, **options)
  assert y.dtype == inputs["x"].dtype and y.shape == y_ref.shape
  assert state.dtype == jnp.float32 and state.shape == state_ref.shape
  tol, gtol = TOLERANCE[case.dtype], GRAD_TOLERANCE[case.dtype]
  assert rel_err(y, y_ref) < tol, f"y: rel err {rel_err(y, y_ref):.2e} >= {tol}"
  assert rel_err(state, state_ref) < tol, f"final_state: {rel_err(state, state_ref):.2e}"
  for name, g_ref in grads_ref.items():
    err = rel_err(grads[name], g_ref)
    assert err < gtol, f"d{name}: rel err {err:.2e} >= {gtol}"
