"""Sweeps the SSD oracle tests over many seeds and prints the worst error per output and
gradient, so each tolerance in ssd_cases.py (and the tests that use it) rests on a measured
spread, not on one lucky draw. Not part of the test suite (too slow for CI):

  JAX_PLATFORMS=cpu python -m tests.kernels.tolerance_sweep [--seeds 20] [--only xla,pallas,sp]

Each case compiles once and runs every seed (inputs and cotangents are arguments). Per case
and per quantity it prints the worst rel. error over the seeds, the seed that gave it, and the
tolerance the tests use; at the end, per (dtype, quantity), the worst over every case, which
is what TOLERANCES in ssd_cases.py must exceed (by about 2x).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents, rel_err, tolerance

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vjp_runner(fn, compile_options=None):
  """jit of (inputs, cotangents) -> (y, state, grads of sum(y*gy) + sum(state*gs))."""
  def run(inp, cot):
    (y, state), vjp = jax.vjp(lambda i: fn(**i), inp)
    (grads,) = vjp((cot[0].astype(y.dtype), cot[1].astype(state.dtype)))
    return y, state, grads
  cache = {}

  def call(inp, cot):
    if "c" not in cache:
      lowered = jax.jit(run).lower(inp, cot)
      cache["c"] = lowered.compile(compiler_options=compile_options or {})
    return cache["c"](inp, cot)
  return call


def _grad_runner(fn):
  """What ssd_cases.check_against_oracle computes: jit(fn) and jit(grad(loss))."""
  fwd = jax.jit(lambda inp: fn(**inp))

  def loss(inp, cot):
    y, state = fn(**inp)
    return (jnp.sum(y.astype(jnp.float32) * cot[0])
            + jnp.sum(state.astype(jnp.float32) * cot[1]))
  grad = jax.jit(jax.grad(loss))

  def call(inp, cot):
    y, state = fwd(inp)
    return y, state, grad(inp, cot)
  return call


def sweep_case(case: Case, runner, seeds, **options):
  """-> {quantity: (worst rel err, seed)} over `seeds`, against the f64 oracle."""
  oracle = _vjp_runner(functools.partial(ssd_oracle, **options))
  worst = {}
  for seed in seeds:
    inputs = make_inputs(case, seed)
    cot = random_cotangents(case, seed)
    y, state, grads = runner(inputs, cot)
    with jax.enable_x64(True):
      inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
      cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
      y_ref, state_ref, grads_ref = oracle(inputs64, cot64)
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(state, state_ref)}
    errs.update({f"d{k}": rel_err(grads[k], g) for k, g in grads_ref.items()})
    for q, e in errs.items():
      if q not in worst or e > worst[q][0]:
        worst[q] = (e, seed)
  return worst


def report(label, case, worst, summary):
  print(f"{label}  ({case.dtype})", flush=True)
  for q, (e, seed) in worst.items():
    tol = tolerance(case.dtype, q)
    flag = "  <-- OVER" if e >= tol else ""
    print(f"    {q:16s} worst {e:.2e} (seed {seed:3d})   tol {tol:.0e}  {e / tol:5.2f}{flag}",
          flush=True)
    key = (case.dtype, q)
    if key not in summary or e > summary[key][0]:
      summary[key] = (e, label)


def sweep_xla(seeds, summary):
  from tests.kernels.test_ssd_reference import CASES
  for name, case in sorted(CASES.items()):
    t0 = time.time()
    fn = functools.partial(ssd, impl="xla", chunk_len=case.chunk_len)
    report(f"xla/{name} [{time.time() - t0:.0f}s]", case,
           sweep_case(case, _grad_runner(fn), seeds), summary)
  case = Case()
  fn = functools.partial(ssd, impl="xla", chunk_len=case.chunk_len, dt_limit=(0.05, 0.6))
  report("xla/dt_limit", case, sweep_case(case, _grad_runner(fn), seeds, dt_limit=(0.05, 0.6)),
         summary)


def sweep_pallas(seeds, summary):
  from tests.kernels.test_ssd_pallas import EXTRA_CASES, SMALL_BLOCKS
  from tests.kernels.test_ssd_reference import CASES
  runs = [(f"pallas/{n}", c, SMALL_BLOCKS) for n, c in sorted(CASES.items())]
  runs += [(f"pallas/{n}", c, o) for n, (c, o) in EXTRA_CASES.items()]
  for label, case, options in runs:
    t0 = time.time()
    fn = functools.partial(ssd, chunk_len=case.chunk_len, impl="pallas", interpret=True,
                           **options)
    worst = sweep_case(case, _vjp_runner(fn, _FAST_COMPILE), seeds)
    report(f"{label} [{time.time() - t0:.0f}s]", case, worst, summary)


def sweep_sequence_parallel(seeds):
  """Against the one-device SSD (not the oracle): 8 simulated devices, in a subprocess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for n_seq, n_groups, with_init in [(8, 1, True), (4, 2, False)]:
    worst = collections.defaultdict(lambda: (0.0, -1))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sequence_parallel_check", str(n_seq),
         str(n_groups), "1" if with_init else "0", ",".join(map(str, seeds))],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
      if line.startswith("RESULT "):
        seed, errs = json.loads(line[7:])
        for q, e in errs.items():
          if e > worst[q][0]:
            worst[q] = (e, seed)
    print(f"sequence_parallel/n_seq{n_seq}_groups{n_groups}_init{int(with_init)} (tol 1e-5)")
    for q, (e, seed) in worst.items():
      print(f"    {q:16s} worst {e:.2e} (seed {seed:3d})", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=20)
  parser.add_argument("--only", default="xla,pallas,sp")
  args = parser.parse_args()
  seeds = list(range(args.seeds))
  only = set(args.only.split(","))
  summary = {}
  print(f"{jax.__version__=} {jax.devices()[0].platform} seeds 0..{args.seeds - 1}", flush=True)
  if "xla" in only:
    sweep_xla(seeds, summary)
  if "pallas" in only:
    sweep_pallas(seeds, summary)
  if "sp" in only:
    sweep_sequence_parallel(seeds)
  print("\nworst per (dtype, quantity) over every case above:")
  for (dtype, q), (e, label) in sorted(summary.items()):
    print(f"  {dtype:9s} {q:16s} {e:.2e}  tol {tolerance(dtype, q):.0e}  ({label})")


if __name__ == "__main__":
  main()
