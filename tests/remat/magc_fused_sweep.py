"""Seed sweep behind test_magc_fused.py's tolerances (a script, not a test).

  JAX_PLATFORMS=cpu python -m tests.remat.magc_fused_sweep --seeds=24
  JAX_PLATFORMS=cpu python -m tests.remat.magc_fused_sweep --seeds=24 --compute_dtype=bfloat16

Prints, per config, the largest relative error over the seeds and the worst leaf. In bfloat16
it runs each config twice, with the SSM state checkpoints in the compute dtype (the default,
`magc_fused.STATE_CHECKPOINTS_IN_COMPUTE_DTYPE`) and in float32, so that what the rounded
checkpoints add shows beside what the blocking alone gives.
"""

from __future__ import annotations

import argparse

from ma2mba_jax.remat import magc_fused
from ma2mba_jax.remat.settings import RematSettings
from tests.remat import test_magc_fused as t


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=24)
  parser.add_argument("--compute_dtype", default="float32")
  args = parser.parse_args()
  variants = [True] if args.compute_dtype == "float32" else [True, False]
  worst = {(name, v): ("", 0.0) for name in t.CONFIGS for v in variants}
  problems = [t.problem(seed, args.compute_dtype) for seed in range(args.seeds)]
  references = [t.value_and_grads(prob, RematSettings(policy="none")) for prob in problems]
  # Against the float32 plain stack (same parameters and inputs): how far each bf16 gradient
  # is from the float32 one, the plain bf16 stack's own distance beside.
  truth = ([t.value_and_grads(t.problem(seed), RematSettings(policy="none"))
            for seed in range(args.seeds)] if args.compute_dtype != "float32" else None)
  far = {}
  if truth:
    for seed, prob in enumerate(problems):
      errs = t.errors(prob, truth[seed], RematSettings(policy="none"))
      far["plain", None] = max(far.get(("plain", None), 0.0), max(errs.values()))
  for v in variants:  # the flag is read at trace time: compile each variant once
    magc_fused.STATE_CHECKPOINTS_IN_COMPUTE_DTYPE = v
    t._compiled.cache_clear()
    for seed, (prob, reference) in enumerate(zip(problems, references)):
      for name, config in t.CONFIGS.items():
        errs = t.errors(prob, reference, t.magc_cfg(*config))
        leaf = max(errs, key=errs.get)
        if errs[leaf] > worst[name, v][1]:
          worst[name, v] = (f"{leaf} (seed {seed})", errs[leaf])
        if truth:
          e = max(t.errors(prob, truth[seed], t.magc_cfg(*config)).values())
          far[name, v] = max(far.get((name, v), 0.0), e)
  magc_fused.STATE_CHECKPOINTS_IN_COMPUTE_DTYPE = True
  for (name, v), (leaf, err) in worst.items():
    states = "compute dtype" if v else "float32"
    print(f"{name} ({args.compute_dtype}, state checkpoints {states}, {args.seeds} seeds): "
          f"max {err:.2e} at {leaf} against the plain {args.compute_dtype} stack"
          + (f"; {far[name, v]:.2e} against the float32 stack" if truth else ""))
  if truth:
    print(f"plain {args.compute_dtype} stack against the float32 stack: max "
          f"{far['plain', None]:.2e}")


if __name__ == "__main__":
  main()
