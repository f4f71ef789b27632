"""Run as a script with N simulated CPU devices: the real trainer (`train_and_evaluate`, its
transfer guard on) on the tiny demo config, once per mesh layout given on the command line,
stopped after step 2 and resumed to step 3 (used by test_multi_device_trainer.py in a
subprocess, since the device count is fixed when JAX starts). Prints per layout the losses
and grad norms of every step, a checksum of the exported parameters and the most bytes of
parameters and optimizer state that one device held.

  python -m tests.train.multi_device_trainer DATA_DIR WORK_ROOT 8,1,1,1 2,2,1,2 4,1,1,2,16,1
      # data,fsdp,zero1,seq[,remat.s,remat.l]   (default s=32, l auto)
"""

import json
import logging as py_logging
import os
import re
import sys

import jax
import numpy as np
from absl import logging
from flax import nnx

from configs import stage2
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.train import trainer

STEPS, STOP = 3, 2


def tiny_config(data_dir: str, data: int, fsdp: int, zero1: bool, seq: int = 1,
                s: int = 32, l: int | None = None):
  c = stage2.get_config("demo")
  c.data.synthetic_dir = data_dir
  c.data.max_tokens = 64
  c.data.max_frames = 4
  c.data.num_workers = 0
  c.optim.global_batch = 8
  c.optim.micro_batch = 1       # 8 micro-batches on one device, 1 over data 8
  c.remat.s = str(s)            # MA-GC, s=32: one time block per piece with seq 2, two
  if l is not None:             # without; s=16: two per piece (the wavefront pipeline)
    c.remat.l = str(l)
  c.optim.warmup_frac = 0.0     # every step moves the parameters
  c.train.steps = STEPS
  c.train.log_every = 1
  c.ckpt.every_steps = 100
  c.eval.batches = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.zero1, c.mesh.seq = data, fsdp, zero1, seq
  return c


class _HeldBytes(py_logging.Handler):
  """Keeps the trainer's 'most bytes on one device' log line."""

  def __init__(self):
    super().__init__()
    self.held = None

  def emit(self, record):
    match = re.search(r"most bytes on one device: params (\d+), optimizer state (\d+)",
                      record.getMessage())
    if match:
      self.held = [int(match.group(1)), int(match.group(2))]


def run_layout(data_dir: str, workdir: str, data: int, fsdp: int, zero1: bool,
               seq: int, s: int = 32, l: int | None = None) -> dict:
  handler = _HeldBytes()
  py_logging.getLogger("absl").addHandler(handler)
  c = tiny_config(data_dir, data, fsdp, zero1, seq, s, l)
  if data * fsdp * seq > 1:           # stop after step 2, then run again: resumes at step 2
    c.train.stop_at_step = STOP
    trainer.train_and_evaluate(c, workdir)
    assert not os.path.exists(os.path.join(workdir, trainer.MODEL_EXPORT))
    c.train.stop_at_step = 0
  trainer.train_and_evaluate(c, workdir)
  py_logging.getLogger("absl").removeHandler(handler)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  model = model_io.restore_model(os.path.join(workdir, trainer.MODEL_EXPORT))
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {"layout": [data, fsdp, int(zero1), seq, s, l], "devices": jax.device_count(),
          "steps": [r["step"] for r in records], "loss": [r["loss"] for r in records],
          "grad_norm": [r["grad_norm"] for r in records],
          "param_sums": [float(np.sum(np.asarray(a, np.float64))) for a in leaves],
          "held_bytes": handler.held}


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  data_dir, work_root = sys.argv[1], sys.argv[2]
  for arg in sys.argv[3:]:
    data, fsdp, zero1, seq, *remat = map(int, arg.split(","))
    workdir = os.path.join(work_root, "_".join(["d", *arg.split(",")]))
    print("RESULT " + json.dumps(run_layout(data_dir, workdir, data, fsdp, bool(zero1), seq,
                                            *remat)), flush=True)
