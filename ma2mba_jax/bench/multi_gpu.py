"""Multi-GPU check and benchmark of one host, in one call (issue 16):

  python -m ma2mba_jax.bench.multi_gpu --gpus=2 --budget_s=480 --json=out.json

1. the user's stage-2 command (the issue's, 3.1B, FSDP over the GPUs, 3 steps, stopped at
   `--trainer_tokens`) through the real trainer: synthetic data, transfer guard, final
   checkpoint and export included;
2. data-parallel tokens/s per GPU of the 3.1B train step (bench/train.py) on 1 GPU
   (CUDA_VISIBLE_DEVICES=0) and on all of them, with ZeRO-1 and plain data parallel;
3. if the budget still allows, the 3.1B step at `--long_tokens` per sample, FSDP over the
   GPUs, with the highest peak memory of any card;
4. (`--parts=seq`) the longest sample (of `--seq_lengths`, tried in order until one fails)
   on one GPU (MA-GC `--one_gpu_remat`) and split over all GPUs by the `seq` mesh axis
   (MA-GC l=`--seq_l`, s=`--seq_s`: time blocks inside each piece run as a wavefront over
   the GPUs, remat/pipeline.py; `--seq_s=0`: one block per piece, s = T / GPUs).

`--trainer_mesh=data,fsdp,zero1,seq` runs part 1 in that layout instead of FSDP over the
GPUs (e.g. 2,1,1,2 on 4 GPUs: ZeRO-1 over 2 rows, each sample in 2 pieces).

Each part runs in its own process (this one never touches a GPU), within what is left of
`--budget_s`; a part out of time or memory is a row with an error. Prints a table, writes
JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_GPUS = flags.DEFINE_integer("gpus", 2, "GPUs of the multi-GPU rows.")
_BUDGET = flags.DEFINE_integer("budget_s", 480, "Seconds for everything.")
_TRAINER_TOKENS = flags.DEFINE_integer("trainer_tokens", 32768,
                                       "config.data.max_tokens of the trainer run (the "
                                       "issue's: 524288).")
_TRAINER_FRAMES = flags.DEFINE_integer("trainer_frames", 200, "config.data.max_frames.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Tokens per sample of the speed rows.")
_LONG = flags.DEFINE_integer("long_tokens", 524288, "Tokens per sample of the long row "
                             "(0: skip).")
_LONG_MIN_S = flags.DEFINE_integer("long_min_s", 240, "Run the long row only with this "
                                   "many seconds left.")
_PRESET = flags.DEFINE_string("preset", "3.1b", "Video-Ma2mba preset.")
_TRAINER_EXTRA = flags.DEFINE_list("trainer_extra", [], "More --config.x=y for the trainer "
                                   "(later ones win).")
_JSON = flags.DEFINE_string("json", None, "Write results here.")
_WORK = flags.DEFINE_string("work", None, "Scratch folder (default: a temporary one).")
_PARTS = flags.DEFINE_list("parts", ["trainer", "dp", "long"], "Which parts to run.")
_DP_MESHES = flags.DEFINE_list("dp_meshes", ["zero1", "dp"],
                               "Multi-GPU speed rows: zero1, dp, seq (one sample over all).")
_TRAINER_MESH = flags.DEFINE_string("trainer_mesh", "", "data,fsdp,zero1,seq of part 1 "
                                    "(default: FSDP over the GPUs).")
_SEQ_LENGTHS = flags.DEFINE_list("seq_lengths", ["262144", "524288", "1048576", "2097152"],
                                 "Part 4: tokens per sample, tried in order until one fails.")
_SEQ_MESHES = flags.DEFINE_list("seq_meshes", ["one", "seq"], "Part 4: one (one GPU), seq (all "
                                "GPUs on one sample); each may be run in its own call.")
_SEQ_L = flags.DEFINE_integer("seq_l", 8, "Part 4: MA-GC layers per group with the seq axis.")
_SEQ_S = flags.DEFINE_integer("seq_s", 0, "Part 4: MA-GC tokens per time block with the seq "
                              "axis (0: one block per piece).")
_SEQ_REMAT = flags.DEFINE_list("seq_remat", ["--cell_saves=layers"], "Part 4: more bench.train "
                               "remat flags of the seq rows, e.g. --offload=all.")
_ONE_GPU_REMAT = flags.DEFINE_list("one_gpu_remat", ["--l=64", "--s=16384",
                                                     "--cell_saves=layers",
                                                     "--offload=sequence"],
                                   "Part 4: bench.train remat flags of the one-GPU rows.")
_BENCH_EXTRA = flags.DEFINE_list("bench_extra", [], "More flags for every bench.train row, e.g. "
                                 "--text_every=0 (text only: the 2.7B LM backbone's step).")
_SEQ_ROW_S = flags.DEFINE_integer("seq_row_s", 420, "Part 4: seconds per length at most.")

_STEP_LINE = re.compile(r"\[stage \d\] step (\d+)/\d+ \| loss ([0-9.naninf]+)")
_STEP_TIME = re.compile(r"\[stage \d\] step \d+/\d+ .*?\| ([0-9.]+) s/step")


class Clock:
  def __init__(self, budget: float):
    self.end = time.monotonic() + budget

  def left(self) -> int:
    return int(self.end - time.monotonic())


def _env(**extra) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95", PYTHONUNBUFFERED="1")
  env.update(extra)
  return env


def _run(cmd: list[str], timeout: int, env: dict) -> tuple[int | str, str, float]:
  start = time.monotonic()
  print("+", " ".join(cmd), f"(limit {timeout}s)", flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                          env=env)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start
  except subprocess.TimeoutExpired as err:
    out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    return f"timeout {timeout}s", out, time.monotonic() - start


def gpu_names() -> list[str]:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return [l.strip() for l in out.splitlines() if l.strip()]
  except (OSError, subprocess.TimeoutExpired):
    return []


def trainer_row(work: str, clock: Clock, limit: int) -> dict:
  data = os.path.join(work, "data")
  rc, out, _ = _run([sys.executable, "-m", "ma2mba_jax.data.synthetic", "--out", data,
                     "--size", "small", "--images", "16", "--clips", "16", "--walks", "16",
                     "--qa-videos", "8", "--qa-val-videos", "2", "--eval-videos", "2"],
                    min(120, clock.left()), _env())
  if rc != 0:
    return {"part": "trainer", "error": f"synthetic data: {rc}: {out[-300:]}"}
  n = _GPUS.value
  if _TRAINER_MESH.value:
    m_data, m_fsdp, m_zero1, m_seq = map(int, _TRAINER_MESH.value.split(","))
    mesh_flags = [f"--config.mesh.data={m_data}", f"--config.mesh.fsdp={m_fsdp}",
                  f"--config.mesh.zero1={bool(m_zero1)}", f"--config.mesh.seq={m_seq}"]
    rows = m_data * m_fsdp
    mesh_name = f"data={m_data},fsdp={m_fsdp},zero1={m_zero1},seq={m_seq}"
  else:
    mesh_flags, rows, mesh_name = [f"--config.mesh.fsdp={n}"], n, f"fsdp={n}"
  cmd = [sys.executable, "-m", "ma2mba_jax.main", "--config=configs/stage2.py",
         f"--workdir={os.path.join(work, 'run')}", f"--config.data.synthetic_dir={data}",
         f"--config.model.preset={_PRESET.value}", *mesh_flags,
         "--config.train.steps=3", f"--config.optim.global_batch={rows}",
         "--config.data.num_workers=4", "--config.remat.l=64", "--config.remat.s=16384",
         "--config.remat.cell_saves=layers", "--config.remat.offload=sequence",
         f"--config.data.max_tokens={_TRAINER_TOKENS.value}",
         f"--config.data.max_frames={_TRAINER_FRAMES.value}", "--config.train.log_every=1",
         "--config.eval.batches=0", *_TRAINER_EXTRA.value]
  rc, out, wall = _run(cmd, min(limit, clock.left()), _env())
  steps = [(int(s), float(loss)) for s, loss in _STEP_LINE.findall(out)]
  times = [float(t) for t in _STEP_TIME.findall(out)]
  row = {"part": "trainer", "mesh": mesh_name, "devices": n, "T": _TRAINER_TOKENS.value,
         "frames": _TRAINER_FRAMES.value, "steps_done": len(steps), "wall_s": wall,
         "command": " ".join(cmd[1:])}
  if steps:
    row["loss"] = steps[-1][1]
  if times:
    row["step_s"] = times[-1]
  mem = re.findall(r"\| mem ([0-9.]+) GiB", out)
  if mem:
    row["peak_GB"] = float(mem[-1]) * 2**30 / 1e9     # the trainer's report (one device)
  held = re.search(r"most bytes on one device: params (\d+), optimizer state (\d+)", out)
  if held:
    row["params_GB_per_device"] = int(held.group(1)) / 1e9
    row["opt_GB_per_device"] = int(held.group(2)) / 1e9
  if rc != 0:
    row["error"] = f"rc {rc}: " + out[-400:].replace("\n", " | ")
  print(out[-1500:], flush=True)
  return row


def bench_row(mesh: str, tokens: int, clock: Clock, limit: int, extra: list[str],
              visible: str | None) -> dict:
  path = os.path.join(tempfile.mkdtemp(), "row.json")
  cmd = [sys.executable, "-m", "ma2mba_jax.bench.train", f"--preset={_PRESET.value}",
         f"--lengths={tokens}", f"--mesh={mesh}", "--steps=3", f"--json={path}",
         f"--timeout={max(1, min(limit, clock.left()) - 5)}", *extra, *_BENCH_EXTRA.value]
  env = _env(**({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}))
  rc, out, wall = _run(cmd, min(limit, clock.left()), env)
  row = {"part": "train_step", "mesh": mesh, "T": tokens, "wall_s": wall,
         "command": ("CUDA_VISIBLE_DEVICES=" + visible + " " if visible else "") +
                    " ".join(c for c in cmd[1:]
                             if not c.startswith(("--json=", "--timeout=")))}
  if os.path.isfile(path):
    with open(path) as f:
      row.update(json.load(f)["rows"][0])
  elif rc != 0:
    row["error"] = f"rc {rc}: " + out[-300:].replace("\n", " | ")
  return row


def longest_row(mesh: str, visible: str | None, clock: Clock) -> dict:
  """The longest of --seq_lengths whose train step runs with this mesh (tried in order,
  stopping at the first failure); the row of that length, with `longest_T`."""
  n_seq = int(mesh.split(",")[3])
  best = {"part": "longest", "mesh": mesh, "longest_T": 0}
  for tokens in map(int, _SEQ_LENGTHS.value):
    if clock.left() < 60:
      best.setdefault("error", f"stopped: {clock.left()}s left before T={tokens}")
      break
    if n_seq > 1:
      remat = ["--policy=magc", f"--l={_SEQ_L.value}",
               f"--s={_SEQ_S.value or -(-tokens // n_seq)}",
               *_SEQ_REMAT.value]
    else:
      remat = list(_ONE_GPU_REMAT.value)
    row = bench_row(mesh, tokens, clock, _SEQ_ROW_S.value, remat, visible)
    print(row, flush=True)
    if row.get("error") or "step_s" not in row:
      best["failed_at"] = f"T={tokens}: {str(row.get('error', 'no step time'))[:120]}"
      break
    best.update({k: v for k, v in row.items() if k != "part"}, longest_T=tokens)
  return best


def main(argv):
  del argv
  clock = Clock(_BUDGET.value)
  work = _WORK.value or tempfile.mkdtemp(prefix="multi_gpu_")
  n = _GPUS.value
  rows = []
  if "trainer" in _PARTS.value:
    rows.append(trainer_row(work, clock, limit=int(_BUDGET.value * 0.40)))
    print(rows[-1], flush=True)
  meshes = [{"zero1": f"{n},1,1", "dp": f"{n},1,0", "seq": f"1,1,0,{n}"}[m]
            for m in _DP_MESHES.value]
  one = {}
  if "dp" in _PARTS.value:
    one = bench_row("1,1,0", _TOKENS.value, clock, 140, [], visible="0")
  if one:
    rows.append(one)
    print(rows[-1], flush=True)
  for mesh in meshes if one else []:
    rows.append(bench_row(mesh, _TOKENS.value, clock, 140, [], visible=None))
    print(rows[-1], flush=True)
    base = one.get("tokens_per_s_per_device")
    if base and rows[-1].get("tokens_per_s_per_device"):
      rows[-1]["vs_1_gpu"] = rows[-1]["tokens_per_s_per_device"] / base
    if clock.left() < 140:
      break
  if "long" not in _PARTS.value:
    pass
  elif _LONG.value and clock.left() >= _LONG_MIN_S.value:
    rows.append(bench_row(f"1,{n},0", _LONG.value, clock, clock.left(),
                          ["--l=64", "--s=16384", "--cell_saves=layers", "--offload=sequence"],
                          visible=None))
  elif _LONG.value:
    rows.append({"part": "train_step", "mesh": f"1,{n},0", "T": _LONG.value,
                 "error": f"not run: {clock.left()}s left"})
  if "seq" in _PARTS.value:
    choices = {"one": ("1,1,0,1", "0"), "seq": (f"1,1,0,{n}", None)}
    for mesh, visible in (choices[m] for m in _SEQ_MESHES.value):
      rows.append(longest_row(mesh, visible, clock))
      print(rows[-1], flush=True)
  print()
  print("GPUs:", "; ".join(gpu_names()))
  columns = ["part", "mesh", "T", "longest_T", "frames", "steps_done", "step_s", "tokens_per_s",
             "tokens_per_s_per_device", "vs_1_gpu", "peak_GB", "params_GB_per_device",
             "opt_GB_per_device", "loss", "wall_s", "error"]
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  columns = [c for c in columns if any(c in r for r in rows)]
  print(" | ".join(c.rjust(widths[c]) for c in columns))
  for r in rows:
    print(" | ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"gpus": gpu_names(), "rows": rows}, f, indent=2)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
  if isinstance(v, str) and len(v) > 60:
    return v[:57] + "..."
  return "-" if v is None else str(v)


if __name__ == "__main__":
  app.run(main)
