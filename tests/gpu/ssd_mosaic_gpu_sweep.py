"""Tolerance sweep for the mosaic_gpu backend's oracle tests (a script, not a test).

    JAX_PLATFORMS=cuda python -m tests.gpu.ssd_mosaic_gpu_sweep [--seeds 20] [--cases a,b]
    JAX_PLATFORMS=cpu python -m tests.gpu.ssd_mosaic_gpu_sweep \
        --module tests.kernels.test_ssd_mosaic_gpu     # the CPU interpreter case

Runs every case of the test module's CASES (impl="mosaic_gpu"; default
tests/gpu/test_ssd_mosaic_gpu.py, on a GPU) against the f64 oracle for seeds 0..N-1 and prints, per dtype and quantity, the worst
relative error and its case, and the tolerance the tests use (worst x 2, rounded up to 1,
2 or 5 x 10^k). Each case compiles once; the seeds only change the inputs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time


def round_up(x: float) -> float:
  """The smallest 1, 2 or 5 x 10^k that is >= x."""
  exp = math.floor(math.log10(x))
  for m in (1, 2, 5, 10):
    if m * 10.0 ** exp >= x * (1 - 1e-12):
      return m * 10.0 ** exp
  raise AssertionError(x)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=20)
  parser.add_argument("--module", default="tests.gpu.test_ssd_mosaic_gpu",
                      help="test module with CASES, TOLERANCES, errors_against_oracle")
  parser.add_argument("--cases", default=None, help="comma-separated names (default: all)")
  args = parser.parse_args()
  module = importlib.import_module(args.module)
  CASES, TOLERANCES = module.CASES, module.TOLERANCES
  errors_against_oracle = module.errors_against_oracle
  args.cases = args.cases or ",".join(CASES)
  n_seeds = args.seeds
  worst: dict[tuple[str, str], tuple[float, str, int]] = {}
  for name in args.cases.split(","):
    case = CASES[name]
    start = time.time()
    for seed in range(n_seeds):
      for q, err in errors_against_oracle(name, seed).items():
        key = (case.dtype, q)
        if key not in worst or err > worst[key][0]:
          worst[key] = (err, name, seed)
    print(f"{name}: {n_seeds} seeds in {time.time() - start:.0f} s", flush=True)
  print(f"\nworst over seeds 0..{n_seeds - 1}: dtype quantity worst (case, seed) -> "
        f"tolerance (current)")
  for (dtype, q), (err, name, seed) in sorted(worst.items()):
    print(f'  {dtype:9s} "{q}": {round_up(2 * err):.0e},  # {err:.1e} {name} (seed {seed})'
          f'   current {TOLERANCES[dtype].get(q)}')


if __name__ == "__main__":
  main()
