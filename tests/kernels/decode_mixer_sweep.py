"""Tolerance sweep of tests/kernels/test_decode_mixer.py and tests/gpu/test_decode_gpu.py
(a script, not a test): every case of decode_mixer_cases.CASES against the float64 oracle
for seeds 0..N-1, per backend, the worst relative error per (dtype, output).

  JAX_PLATFORMS=cpu python -m tests.kernels.decode_mixer_sweep [--seeds 20]  # xla, interpret
  JAX_PLATFORMS=cuda python -m tests.kernels.decode_mixer_sweep --impls pallas  # the GPU kernel
  ... --fused_reduce    # the 1/rms from raw's extra column, the conv stack in place
"""

from __future__ import annotations

import argparse
import collections

import jax

from tests.kernels.decode_mixer_cases import CASES, TOLERANCES, errors


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=20)
  parser.add_argument("--impls", default="xla,pallas")
  parser.add_argument("--fused_reduce", action="store_true",
                      help="call mixer_step as the fused_reduce step does (errors(...))")
  args = parser.parse_args()
  worst = collections.defaultdict(lambda: (0.0, ""))
  for impl in args.impls.split(","):
    for name, case in CASES.items():
      for seed in range(args.seeds):
        for out, err in errors(case, seed, impl, fused_reduce=args.fused_reduce).items():
          key = (impl, case.dtype, out)
          if err > worst[key][0]:
            worst[key] = (err, f"{name} seed {seed}")
  print(f"{jax.default_backend()}, seeds 0..{args.seeds - 1}")
  for (impl, dtype, out), (err, where) in sorted(worst.items()):
    print(f"{impl:7s} {dtype:9s} {out:5s} worst {err:.3e} ({where}); tolerance "
          f"{TOLERANCES[dtype]:.0e}")


if __name__ == "__main__":
  main()
