"""Sweeps the segment-reset checks of test_ssd_segments.py over many seeds and prints the
worst rel. error per check and quantity (whole arrays and, for the per-step ones, the worst
single segment), so the tolerances there rest on a measured spread. Not a test (slow):

  JAX_PLATFORMS=cpu python -m tests.kernels.ssd_segments_sweep [--seeds 24] \
      [--only packed,random,blocked,sp] [--impls xla,pallas]

Each configuration compiles once and runs every seed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

from tests.kernels import test_ssd_segments as seg


def _worst(table, name, errs, seed):
  for q, e in errs.items():
    if e > table[name].get(q, (-1.0, None))[0]:
      table[name][q] = (e, seed)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=24)
  parser.add_argument("--only", default="packed,random,blocked,sp")
  parser.add_argument("--impls", default="xla,pallas")
  args = parser.parse_args()
  only = set(args.only.split(","))
  impls = args.impls.split(",")
  seeds = list(range(args.seeds))
  table = collections.defaultdict(dict)
  start = time.time()
  for impl in impls:
    for dtype in ("float32", "bfloat16"):
      for kind, check in (("packed", seg.packed_check), ("random", seg.random_check)):
        if kind not in only:
          continue
        name = f"{kind}/{impl}/{dtype}"
        for s in seeds:
          got, want, reset = check(impl, dtype, s)
          _worst(table, name, {**seg.errors(got, want),
                               **seg.segment_errors(got, want, reset)}, s)
        print(f"{name}: done ({time.time() - start:.0f} s)", flush=True)
    if "blocked" in only:
      name = f"blocked/{impl}/float32"
      for s in seeds:
        got, want = seg.blocked_check(impl, s)
        _worst(table, name, seg.errors(got, want), s)
      print(f"{name}: done ({time.time() - start:.0f} s)", flush=True)
  if "sp" in only:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=seg.ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-m", "tests.kernels.test_ssd_segments", "sp",
                          ",".join(map(str, seeds))], cwd=seg.ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    for s, line in zip(seeds, [l for l in out.splitlines() if l.startswith("RESULT ")]):
      _worst(table, "sequence_parallel/xla/float32", json.loads(line[7:]), s)
  print(f"\nworst over seeds {seeds[0]}..{seeds[-1]} ({time.time() - start:.0f} s):")
  for name in sorted(table):
    print(name)
    for q, (e, s) in sorted(table[name].items()):
      print(f"  {q:18s} {e:.2e}  (seed {s})")


if __name__ == "__main__":
  main()
