"""Seed sweep behind test_fused_block.py's tolerance (a script, not a test).

  JAX_PLATFORMS=cpu python -m tests.models.fused_block_sweep --seeds=24

Prints, per config, the largest relative error of the fused block against autodiff over
the seeds, for the outputs and for the gradients, and the worst leaf.
"""

from __future__ import annotations

import argparse

from tests.models.test_fused_block import CONFIGS, errors


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=24)
  parser.add_argument("--compute_dtype", default="float32")
  args = parser.parse_args()
  for name, config in CONFIGS.items():
    config = config.replace(compute_dtype=args.compute_dtype)
    worst = {}
    for seed in range(args.seeds):
      for leaf, err in errors(config, seed).items():
        worst[leaf] = max(worst.get(leaf, 0.0), err)
    outs = {k: v for k, v in worst.items() if k.startswith("out.")}
    grads = {k: v for k, v in worst.items() if k.startswith("grad.")}
    g_leaf = max(grads, key=grads.get)
    print(f"{name} ({args.compute_dtype}, {args.seeds} seeds): outputs max "
          f"{max(outs.values()):.2e}, gradients max {grads[g_leaf]:.2e} ({g_leaf})")
    for leaf, err in sorted(worst.items()):
      print(f"  {leaf}: {err:.2e}")


if __name__ == "__main__":
  main()
