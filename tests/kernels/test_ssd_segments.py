"""Segment resets in the SSD (`ssd(..., reset=)`, packed rows) on CPU.

The reference for a packed row is the float64 oracle run on each segment alone, with
reset=None: it does not rely on any implementation of `reset`. Checked for the `xla`
backend and the Pallas kernels (interpret mode), outputs and the gradient of every input:
  - a packed row equals its segments run alone (segments that start mid-chunk, exactly at a
    chunk boundary, several in one chunk, of length 1, at t = 0 and at t = T-1; the first
    segment of a row takes the initial state unless the row resets at t = 0);
  - random resets against the oracle with `reset` (odd T, groups, D per channel);
  - a time-blocked call (T split into blocks, `reset` sliced, each block's final state
    passed on as the next one's initial state, gradients chained back by hand as MA-GC
    does) equals the unblocked call, with block edges at a reset, mid-segment, mid-chunk;
  - the sequence-parallel SSD with resets equals the one-device SSD (4 simulated devices,
    in a subprocess: `python -m tests.kernels.test_ssd_segments sp`).

Tolerances (rel. error) come from `python -m tests.kernels.ssd_segments_sweep` (seeds 0..23,
every check above on xla and pallas, float32 and bfloat16; 2026-11-26). Worst seen:
  float32   whole arrays: outputs 3.5e-07, gradients 1.6e-06 (ddt_bias; dA 1.2e-06)
            one segment:  y, dx 1.1e-06; ddt, dB, dC 8.8e-06
  bfloat16  whole arrays: outputs 3.1e-03, gradients 1.0e-02 (dA; the others <= 7.9e-03)
            one segment:  y, dx 9.5e-03; ddt, dB, dC 5.9e-02 (short segments: small
            gradients, rounded to bf16)
  blocked vs unblocked (float32, same backend): 1.5e-06
  sequence-parallel vs one device (float32):    9.3e-07
The limits below are about 5x those (float32) and 2x (bfloat16).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import reset_from_segment_ids, ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents, rel_err

TOL = {"float32": 2e-6, "bfloat16": 7e-3}                   # y, final_state
GRAD_TOL = {"float32": 1e-5, "bfloat16": 2.5e-2}            # every gradient
# One segment alone: (limit for y and dx, limit for ddt, dB and dC).
SEG_TOL = {"float32": (6e-6, 5e-5), "bfloat16": (2e-2, 1.2e-1)}
BLOCKED_TOL = 8e-6        # float32, blocked vs unblocked call of the same backend
SP_TOL = 5e-6             # float32, sequence-parallel vs one device

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# T = 40, chunk 8 (chunk edges at 8, 16, 24, 32). Steps where a segment starts:
#   row 0: 5 (mid-chunk), 8 (at a chunk edge, length 1), 9 (length 1), 10, 24 (at an edge)
#          -> segments of 5 (with the initial state), 3 (ends at an edge), 1, 1, 14, 16;
#   row 1: 0 (the initial state reaches nothing), 16 (edge), 21, 22 (three in one chunk),
#          23, 39 (the last step) -> segments of 16, 5, 1, 1, 16, 1.
SEQLEN, CHUNK = 40, 8
RESET_STEPS = ((5, 8, 9, 10, 24), (0, 16, 21, 22, 23, 39))
PACKED = Case(batch=2, seqlen=SEQLEN, n_heads=4, n_groups=2, head_dim=8, d_state=16,
              chunk_len=CHUNK, with_initial_state=True)
# Random resets: odd T, D per channel, 3 chunks of 16 cut into tiles of 4 (SMALL_BLOCKS).
RANDOM = Case(batch=2, seqlen=45, n_heads=4, n_groups=2, head_dim=8, d_state=16,
              chunk_len=16, with_initial_state=True, D_per_channel=True)
SMALL_BLOCKS = dict(block_l=4, block_p=4, block_r=4, block_s=32, contract_heads=2,
                    dcb_heads=1)
BLOCK_LEN = 10            # blocked call: edges at 10 (a reset in row 0), 20, 30 (mid-chunk)

IMPLS = {"xla": dict(impl="xla"), "pallas": dict(impl="pallas", interpret=True)}


def packed_reset(batch: int = 2) -> np.ndarray:
  reset = np.zeros((batch, SEQLEN), bool)
  for b, steps in enumerate(RESET_STEPS[:batch]):
    reset[b, list(steps)] = True
  return reset


def random_reset(case: Case, seed: int) -> np.ndarray:
  """About one step in six starts a segment; row 0 also resets at t = 0."""
  reset = np.random.default_rng(seed).random((case.batch, case.seqlen)) < 0.17
  reset[0, 0] = True
  return reset


# ------------------------------------------------------------------------------------
# Runners: (y, final_state, grads of sum(y*gy) + sum(state*gs)) from one compiled function.


def vjp_runner(fn, compile_options=None):
  """fn(reset, **inputs) -> (y, state); returns call(inputs, cot, reset=None) -> (y, state,
  grads of every input), compiled once per shapes (reset is an argument, not a constant)."""
  def run(inp, cot, reset):
    (y, state), vjp = jax.vjp(lambda i: fn(reset, **i), inp)
    (grads,) = vjp((cot[0].astype(y.dtype), cot[1].astype(state.dtype)))
    return y, state, grads
  cache = {}

  def call(inp, cot, reset=None):
    args = (inp, cot, None if reset is None else jnp.asarray(reset))
    key = str(jax.tree.map(lambda a: (a.shape, a.dtype), args))
    if key not in cache:
      cache[key] = jax.jit(run).lower(*args).compile(compiler_options=compile_options or {})
    return jax.tree.map(np.asarray, cache[key](*args))
  return call


_RUNNERS: dict = {}


def backend_runner(impl: str, chunk_len: int, **options):
  """A vjp_runner of `impl` taking reset as an argument, one per configuration (so a sweep
  over seeds compiles once)."""
  key = (impl, chunk_len, tuple(sorted(options.items())))
  if key not in _RUNNERS:
    _RUNNERS[key] = vjp_runner(
        lambda reset, **i: backend(impl, chunk_len, reset, **options)(**i), _FAST_COMPILE)
  return _RUNNERS[key]


def backend(impl: str, chunk_len: int, reset=None, **options):
  return functools.partial(ssd, chunk_len=chunk_len, reset=reset, **IMPLS[impl], **options)


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def oracle_run(inputs, cot, reset=None):
  """The f64 oracle's (y, state, grads) on the same (rounded) inputs."""
  with jax.enable_x64(True):
    return _ORACLE(_f64(inputs), _f64(cot), reset)


_ORACLE = vjp_runner(lambda reset, **i: ssd_oracle(**i, reset=reset))


def segments(reset_row: np.ndarray) -> list[tuple[int, int]]:
  """[(start, end)] of the segments of one row."""
  starts = sorted({0} | set(np.flatnonzero(reset_row).tolist()))
  return list(zip(starts, starts[1:] + [len(reset_row)]))


PER_STEP = ("x", "dt", "B", "C")          # inputs with a T axis
SHARED = ("A", "D", "dt_bias")            # gradients summed over every segment


def segments_alone(inputs, cot, reset):
  """The oracle on every segment alone (reset=None), assembled into the packed layout:
  y, final_state, and the gradient of every input."""
  batch = reset.shape[0]
  y = np.zeros(inputs["x"].shape)
  state = np.zeros(cot[1].shape)
  grads = {k: np.zeros(np.shape(v)) for k, v in inputs.items()}
  for b in range(batch):
    spans = segments(reset[b])
    for i, (t0, t1) in enumerate(spans):
      last = i == len(spans) - 1
      part = {k: (v[b:b + 1, t0:t1] if k in PER_STEP else v) for k, v in inputs.items()
              if k != "initial_state"}
      # Always an initial state (zero unless inherited): one compile per length.
      gets_init = "initial_state" in inputs and t0 == 0 and not reset[b, 0]
      part["initial_state"] = (inputs["initial_state"][b:b + 1] if gets_init
                               else jnp.zeros_like(cot[1][b:b + 1]))
      gs = cot[1][b:b + 1] if last else jnp.zeros_like(cot[1][b:b + 1])
      y_s, state_s, g = oracle_run(part, (cot[0][b:b + 1, t0:t1], gs))
      y[b, t0:t1] = y_s[0]
      if last:
        state[b] = state_s[0]
      for k in PER_STEP:
        grads[k][b, t0:t1] = g[k][0]
      for k in SHARED:
        if k in g:
          grads[k] += g[k]
      if gets_init:
        grads["initial_state"][b] = g["initial_state"][0]
  return y, state, grads


def assert_matches(dtype, got, want, reset=None, tol=None, gtol=None, seg_tol=None):
  """Every output and gradient within tolerance over the whole arrays; with `reset`, the
  per-step ones (y, dx, ddt, dB, dC) also segment by segment, so that a wrong short segment
  cannot hide in a long row's norm. seg_tol: (limit for y and dx, limit for ddt, dB, dC)."""
  tol = TOL[dtype] if tol is None else tol
  gtol = GRAD_TOL[dtype] if gtol is None else gtol
  seg_tol = SEG_TOL[dtype] if seg_tol is None else seg_tol
  (y, state, grads), (y_ref, state_ref, grads_ref) = got, want
  assert set(grads) == set(grads_ref)
  pairs = [("y", y, y_ref, tol), ("final_state", state, state_ref, tol)]
  pairs += [(f"d{k}", grads[k], grads_ref[k], gtol) for k in sorted(grads_ref)]
  for name, a, ref, limit in pairs:
    err = rel_err(a, ref)
    assert err < limit, f"{name}: rel err {err:.2e} >= {limit:.0e} ({dtype})"
    if reset is not None and name in ("y", "dx", "ddt", "dB", "dC"):
      limit = seg_tol[0] if name in ("y", "dx") else seg_tol[1]
      for b in range(reset.shape[0]):
        for t0, t1 in segments(reset[b]):
          err = rel_err(a[b, t0:t1], ref[b, t0:t1])
          assert err < limit, (f"{name} row {b} steps {t0}:{t1}: rel err {err:.2e} >= "
                               f"{limit:.0e} ({dtype})")


def errors(got, want) -> dict[str, float]:
  """{quantity: rel. err} over the whole arrays."""
  (y, state, grads), (y_ref, state_ref, grads_ref) = got, want
  out = {"y": rel_err(y, y_ref), "final_state": rel_err(state, state_ref)}
  out.update({f"d{k}": rel_err(grads[k], grads_ref[k]) for k in grads_ref})
  return out


def segment_errors(got, want, reset) -> dict[str, float]:
  """Worst per-segment rel. err of the per-step quantities."""
  (y, _, grads), (y_ref, _, grads_ref) = got, want
  out = {}
  for name, a, ref in [("y", y, y_ref)] + [(f"d{k}", grads[k], grads_ref[k])
                                           for k in PER_STEP]:
    out[name + "/seg"] = max(rel_err(a[b, t0:t1], ref[b, t0:t1])
                             for b in range(reset.shape[0]) for t0, t1 in segments(reset[b]))
  return out


# ------------------------------------------------------------------------------------
# The checks (also run by the sweep over many seeds).


def packed_check(impl: str, dtype: str, seed: int):
  """(got, want, reset): a packed row on `impl` vs its segments alone on the oracle."""
  case = Case(**{**PACKED.__dict__, "dtype": dtype})
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  reset = packed_reset()
  got = backend_runner(impl, CHUNK)(inputs, cot, reset)
  return got, segments_alone(inputs, cot, reset), reset


def random_check(impl: str, dtype: str, seed: int):
  """(got, want, reset): random resets on `impl` vs the oracle with the same resets."""
  case = Case(**{**RANDOM.__dict__, "dtype": dtype})
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  reset = random_reset(case, seed)
  options = SMALL_BLOCKS if impl == "pallas" else {}
  got = backend_runner(impl, case.chunk_len, **options)(inputs, cot, reset)
  return got, oracle_run(inputs, cot, reset), reset


@functools.cache
def _block_fns(impl: str):
  """Jitted forward and vjp of one time block (initial_state in, final state out)."""
  fn = backend(impl, CHUNK)

  def block_fn(inp, state_in, reset_b):
    return fn(**inp, initial_state=state_in, reset=reset_b)

  fwd = jax.jit(block_fn)

  @jax.jit
  def bwd(inp, state_in, reset_b, gy, gs):
    _, vjp = jax.vjp(lambda i, s: block_fn(i, s, reset_b), inp, state_in)
    return vjp((gy.astype(inp["x"].dtype), gs))
  return fwd, bwd


def blocked(impl: str, inputs, cot, reset, block_len: int):
  """(y, state, grads) of `impl` called on time blocks of `block_len`, the state chained
  forward through initial_state and its gradient chained backward by hand."""
  seqlen = reset.shape[1]
  fwd, bwd = _block_fns(impl)
  edges = list(range(0, seqlen, block_len)) + [seqlen]
  spans = list(zip(edges[:-1], edges[1:]))
  part = lambda t0, t1: {k: (v[:, t0:t1] if k in PER_STEP else v) for k, v in inputs.items()
                         if k != "initial_state"}
  states = [inputs["initial_state"]]
  ys = []
  for t0, t1 in spans:
    y_b, s_b = fwd(part(t0, t1), states[-1], reset[:, t0:t1])
    ys.append(y_b)
    states.append(s_b)
  grads = {k: jnp.zeros_like(v) for k, v in inputs.items()}
  g_state = cot[1]
  for i in reversed(range(len(spans))):
    t0, t1 = spans[i]
    g_inp, g_state = bwd(part(t0, t1), states[i], reset[:, t0:t1], cot[0][:, t0:t1], g_state)
    for k, g in g_inp.items():
      grads[k] = grads[k].at[:, t0:t1].set(g) if k in PER_STEP else grads[k] + g
  grads["initial_state"] = g_state
  return jax.tree.map(np.asarray, (jnp.concatenate(ys, axis=1), states[-1], grads))


def blocked_check(impl: str, seed: int):
  """(got, want): the blocked call vs the unblocked call of the same backend (float32)."""
  inputs = make_inputs(PACKED, seed)
  cot = random_cotangents(PACKED, seed)
  reset = jnp.asarray(packed_reset())
  whole = backend_runner(impl, CHUNK)(inputs, cot, reset)
  return blocked(impl, inputs, cot, reset, BLOCK_LEN), whole


# ------------------------------------------------------------------------------------
# Tests


def test_reset_from_segment_ids():
  ids = jnp.array([[3, 3, 7, 7, 7, 1], [0, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(
      reset_from_segment_ids(ids),
      [[False, False, True, False, False, True], [False, True, True, False, True, False]])
  assert reset_from_segment_ids(ids).dtype == jnp.bool_


def test_reset_checks():
  inputs = make_inputs(Case(batch=2, seqlen=12), seed=0)
  with pytest.raises(ValueError, match=r"reset must be \[B, T\] = \(2, 12\)"):
    ssd(**inputs, chunk_len=8, reset=jnp.zeros((2, 11), bool))
  with pytest.raises(TypeError, match="reset must be a bool or integer array"):
    ssd(**inputs, chunk_len=8, reset=jnp.zeros((2, 12), jnp.float32))


def test_oracle_packed_row_equals_segments_alone():
  """The oracle's own `reset` against the oracle on each segment (f64: near round-off)."""
  inputs = make_inputs(PACKED, seed=1)
  cot = random_cotangents(PACKED, seed=1)
  reset = packed_reset()
  assert_matches("float32", oracle_run(inputs, cot, reset), segments_alone(inputs, cot, reset),
                 reset, tol=1e-12, gtol=1e-12)


def test_no_reset_equals_reset_none_and_resets_matter():
  """All-False resets give reset=None's result; integer resets work like bool ones; and a
  reset changes the result (the packed test could not pass with `reset` ignored)."""
  inputs = make_inputs(PACKED, seed=2)
  run = jax.jit(lambda inp, reset: ssd(**inp, chunk_len=CHUNK, impl="xla", reset=reset))
  none = run(inputs, None)
  off = run(inputs, jnp.zeros((2, SEQLEN), bool))
  for a, b in zip(none, off):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  reset = packed_reset()
  as_bool = run(inputs, jnp.asarray(reset))
  as_int = run(inputs, jnp.asarray(reset, jnp.int32) * 3)
  for a, b in zip(as_bool, as_int):
    np.testing.assert_array_equal(a, b)
  assert rel_err(as_bool[0], none[0]) > 0.1


@pytest.mark.parametrize("impl,dtype,seed", [("xla", "float32", 3), ("xla", "bfloat16", 4),
                                             ("pallas", "float32", 5)])
def test_packed_row_equals_segments_alone(impl, dtype, seed):
  got, want, reset = packed_check(impl, dtype, seed)
  assert_matches(dtype, got, want, reset)


@pytest.mark.parametrize("impl,dtype,seed", [("xla", "float32", 6), ("pallas", "bfloat16", 7)])
def test_random_resets_match_oracle(impl, dtype, seed):
  got, want, reset = random_check(impl, dtype, seed)
  assert_matches(dtype, got, want, reset)


@pytest.mark.parametrize("impl,seed", [("xla", 8), ("pallas", 9)])
def test_blocked_call_equals_unblocked(impl, seed):
  got, want = blocked_check(impl, seed)
  assert_matches("float32", got, want, tol=BLOCKED_TOL, gtol=BLOCKED_TOL)


def test_sequence_parallel_with_resets():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_ssd_segments", "sp", "10"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errs = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert set(errs) == {"y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias",
                       "dinitial_state"}
  for name, err in errs.items():
    assert err < SP_TOL, (name, err)


# ------------------------------------------------------------------------------------
# Sequence parallel (run in a subprocess with simulated devices)


def sequence_parallel_errors_fn(n_dev: int = 4):
  """-> errors(seed): {quantity: rel. err} of ssd_sequence_parallel with resets against the
  one-device xla call. T = 32 over 4 devices (pieces of 8, chunk 4): resets at a piece edge
  (8, 16), mid-piece (13), the piece [24, 32) has none, row 1 resets at t = 0 and at 2, 3."""
  from jax.sharding import Mesh
  from ma2mba_jax.kernels.ssd.sequence_parallel import ssd_sequence_parallel
  case = Case(batch=2, seqlen=32, n_heads=4, n_groups=2, chunk_len=4, with_initial_state=True)
  reset = np.zeros((2, 32), bool)
  reset[0, [8, 13]] = True
  reset[1, [0, 2, 3, 16, 17]] = True
  reset = jnp.asarray(reset)
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("sequence",))
  one = vjp_runner(lambda r, **i: ssd(**i, chunk_len=4, impl="xla", reset=r))
  many = vjp_runner(lambda r, **i: ssd_sequence_parallel(**i, mesh=mesh, chunk_len=4,
                                                         impl="xla", reset=r))

  def errs(seed: int) -> dict[str, float]:
    inputs = make_inputs(case, seed)
    cot = random_cotangents(case, seed)
    return errors(many(inputs, cot, reset), one(inputs, cot, reset))
  return errs


if __name__ == "__main__" and sys.argv[1:2] == ["sp"]:
  fn = sequence_parallel_errors_fn()
  for s in sys.argv[2].split(","):
    print("RESULT " + json.dumps(fn(int(s))), flush=True)
