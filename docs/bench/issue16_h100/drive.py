"""Issue 16's GPU driver (one device call): runs trainer commands (python -m ma2mba_jax.main)
side by side or one after another, each stopped once it has logged step `stop` (or at its
deadline: the process and its data workers are killed, so no final checkpoint is written),
and prints a table from each run's metrics.jsonl: s/step and tokens/s of the steps after
the first (which compiles), the peak memory of every device.

  python docs/bench/issue16_h100/drive.py SPEC.json OUT_DIR

SPEC: {"phases": [[job, ...], ...]}; the jobs of a phase run at once, phases in order;
job: {"name", "cmd" (list), "env" (dict), "stop" (step), "deadline_s" (from the phase's
start), "fallback" (a job run if this one exits before its first step, within the deadline)}.
"""

import json
import os
import signal
import subprocess
import sys
import time


def launch(job, out_dir):
  log = open(os.path.join(out_dir, job["name"] + ".log"), "w")
  env = {**os.environ, **job.get("env", {})}
  print(f"[drive] {time.strftime('%H:%M:%S')} start {job['name']}: "
        f"{' '.join(job['cmd'])} env={job.get('env', {})}", flush=True)
  proc = subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True)
  return {"job": job, "proc": proc, "log": log, "started": time.time(), "end": None,
          "why": None}


def metrics(job):
  path = os.path.join(job["workdir"], "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(l) for l in f if l.strip()]
  return [r for r in rows if "loss" in r]


def stop(run, why):
  if run["proc"].poll() is None:
    try:
      os.killpg(run["proc"].pid, signal.SIGKILL)   # the process group this driver started
    except ProcessLookupError:
      pass
    run["proc"].wait()
  run["why"] = run["why"] or why
  run["end"] = time.time()
  run["log"].close()


def run_phase(jobs, out_dir):
  t0 = time.time()
  running = [launch(j, out_dir) for j in jobs]
  done = []
  while running:
    time.sleep(2)
    for run in list(running):
      job = run["job"]
      steps = [r["step"] for r in metrics(job)]
      last = max(steps, default=0)
      if last >= job["stop"]:
        stop(run, f"reached step {last}")
      elif run["proc"].poll() is not None:
        rc = run["proc"].returncode
        stop(run, f"exited rc={rc} after step {last}")
        if last == 0 and job.get("fallback") and time.time() - t0 < job["deadline_s"] - 60:
          fb = dict(job["fallback"])
          fb["deadline_s"] = job["deadline_s"]
          new = launch(fb, out_dir)
          running.append(new)
      elif time.time() - t0 > job["deadline_s"]:
        stop(run, f"deadline {job['deadline_s']} s after step {last}")
      if run["end"] is not None:
        running.remove(run)
        done.append(run)
        print(f"[drive] {time.strftime('%H:%M:%S')} {job['name']}: {run['why']} "
              f"({run['end'] - run['started']:.0f} s)", flush=True)
  return done


def summary(run):
  job = run["job"]
  rows = metrics(job)
  out = {"name": job["name"], "why": run["why"], "wall_s": run["end"] - run["started"],
         "steps": len(rows)}
  timed = [r for r in rows if "step_time_s" in r]
  if rows:
    out["first_step_done_s"] = rows[0].get("wall_s")
    out["losses"] = [round(r["loss"], 4) for r in rows]
    peaks = {k: max(r[k] for r in rows if k in r) for k in rows[-1] if
             k.startswith("peak_memory_gib")}
    out["peak_gib"] = peaks
  if timed:
    times = sorted(r["step_time_s"] for r in timed)
    out["step_s"] = [round(r["step_time_s"], 2) for r in timed]
    out["median_step_s"] = times[len(times) // 2] if len(times) % 2 else (
        times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    out["padded_tokens_per_s"] = [round(r["padded_tokens_per_s"]) for r in timed]
    out["tokens_per_s"] = [round(r["tokens_per_s"]) for r in timed]
  with open(job["log_path"], errors="replace") as f:
    text = f.read()
  for key in ("MA-GC for", "optim.state_memory=auto", "most bytes on one device", "Error",
              "RESOURCE_EXHAUSTED", "out of memory"):
    lines = [l.strip()[:400] for l in text.splitlines() if key in l]
    if lines:
      out.setdefault("log", []).extend(lines[-2:])
  return out


def main():
  spec = json.load(open(sys.argv[1]))
  out_dir = sys.argv[2]
  os.makedirs(out_dir, exist_ok=True)
  results = []
  for phase in spec["phases"]:
    for job in phase:
      for j in (job, job.get("fallback")):
        if j:
          j["workdir"] = next(a.split("=", 1)[1] for a in j["cmd"] if a.startswith("--workdir="))
          j["log_path"] = os.path.join(out_dir, j["name"] + ".log")
    for run in run_phase(phase, out_dir):
      results.append(summary(run))
      print(json.dumps(results[-1]), flush=True)
  json.dump(results, open(os.path.join(out_dir, "summary.json"), "w"), indent=1)
  print("\n[drive] summary")
  for r in results:
    print(f"{r['name']:28s} steps={r['steps']} median_s={r.get('median_step_s')} "
          f"peak_gib={r.get('peak_gib')} why={r['why']}")


if __name__ == "__main__":
  main()
