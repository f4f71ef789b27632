"""Tolerance sweep of test_sharding.py: every layout against one device over many seeds
(model init and batch), printing the worst relative error of each compared quantity.

  python -m tests.train.sharding_sweep --seeds=20 [--raw=FILE]   # runs 8 simulated devices

--raw keeps the RESULT lines (re-read with --from_raw=FILE instead of running again).
"""

import json
import subprocess
import sys

from tests.train.test_sharding import (COMPARED, LAYOUTS, REFERENCE, ROOT, env_8_devices,
                                       rel_errors)


def main(n_seeds: int, raw: str | None, from_raw: str | None) -> None:
  if from_raw:
    with open(from_raw) as f:
      stdout = f.read()
  else:
    seeds = ",".join(map(str, range(n_seeds)))
    proc = subprocess.run([sys.executable, "-m", "tests.train.multi_device_step",
                           *LAYOUTS.values(), f"--seed={seeds}"], cwd=ROOT,
                          env=env_8_devices(), capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    if raw:
      with open(raw, "w") as f:
        f.write(stdout)
  rows = [json.loads(l[len("RESULT "):]) for l in stdout.splitlines()
          if l.startswith("RESULT ")]
  by = {(",".join(map(str, r["layout"])), r["seed"]): r for r in rows}
  seeds = sorted({r["seed"] for r in rows})
  for name in COMPARED:
    worst = {}
    for seed in seeds:
      errors = rel_errors(by[(LAYOUTS[name], seed)], by[(LAYOUTS[REFERENCE[name]], seed)])
      for key, err in errors.items():
        if err >= worst.get(key, (0.0, None))[0]:
          worst[key] = (err, seed)
    print(name, f"({len(seeds)} seeds)",
          json.dumps({k: f"{e:.1e} (seed {s})" for k, (e, s) in worst.items()}))


if __name__ == "__main__":
  options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
  main(int(options.get("seeds", 20)), options.get("raw"), options.get("from_raw"))
