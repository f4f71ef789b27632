"""Seed sweep behind test_packing.py's tolerances (a script, not a test).

  JAX_PLATFORMS=cpu python -m tests.models.packing_sweep --seeds=20 [--cases=fused-xla,...]

Prints, per case, the largest relative error of a packed row against its segments run
alone over the seeds: outputs, final states, and gradients (with the worst leaf).
"""

from __future__ import annotations

import argparse

from tests.models.test_packing import ALL_CASES, errors


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=20)
  parser.add_argument("--cases", default=",".join(ALL_CASES))
  args = parser.parse_args()
  for case in args.cases.split(","):
    worst = {}
    for seed in range(args.seeds):
      for name, err in errors(case, seed).items():
        worst[name] = max(worst.get(name, 0.0), err)
    grads = {k: v for k, v in worst.items() if k.startswith("grad.")}
    g_leaf = max(grads, key=grads.get)
    print(f"{case} ({args.seeds} seeds): out {worst['out']:.2e}, state.conv "
          f"{worst['state.conv']:.2e}, state.ssm {worst['state.ssm']:.2e}, gradients "
          f"{grads[g_leaf]:.2e} ({g_leaf})", flush=True)


if __name__ == "__main__":
  main()
