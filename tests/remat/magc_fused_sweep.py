"""Seed sweep behind test_magc_fused.py's tolerance (a script, not a test).

  JAX_PLATFORMS=cpu python -m tests.remat.magc_fused_sweep --seeds=24

Prints, per config, the largest relative error over the seeds and the worst leaf.
"""

from __future__ import annotations

import argparse

from ma2mba_jax.remat.settings import RematSettings
from tests.remat.test_magc_fused import CONFIGS, errors, magc_cfg, problem, value_and_grads


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=24)
  args = parser.parse_args()
  worst = {name: ("", 0.0) for name in CONFIGS}
  for seed in range(args.seeds):
    prob = problem(seed)
    reference = value_and_grads(prob, RematSettings(policy="none"))
    for name, config in CONFIGS.items():
      errs = errors(prob, reference, magc_cfg(*config))
      leaf = max(errs, key=errs.get)
      if errs[leaf] > worst[name][1]:
        worst[name] = (f"{leaf} (seed {seed})", errs[leaf])
  for name, (leaf, err) in worst.items():
    print(f"{name} ({args.seeds} seeds): max {err:.2e} at {leaf}")


if __name__ == "__main__":
  main()
