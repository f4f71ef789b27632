"""Writes drive.py's spec for issue 16's GPU calls: `a` (the stage-2 step at 524,288 tokens
with ZeRO-1 on GPUs 0,1; the one-GPU baseline on GPU 2; one GPU at 2^20 on GPU 3, all at
once) or `b` (one sample over 4 GPUs with the sequence axis: 2^20 tokens, else 2^19).

  python docs/bench/issue16_h100/make_spec.py a|b DEADLINE_S SPEC.json

Every command is the real trainer entry. XLA_PYTHON_CLIENT_MEM_FRACTION is launch/*.sh's
0.95 of an 80 GB H100 (81,559 MiB), scaled down on larger cards, so no card goes past it.
"""
import json
import subprocess
import sys

which, deadline, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
total = max(int(x) for x in subprocess.check_output(
    ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
    text=True).split())
frac = round(min(0.95, 0.95 * 81559 / total), 3)
ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(frac)}


def trainer(name, data, gpus, *flags, stop=3, fallback=None):
  cmd = ["python", "-m", "ma2mba_jax.main", "--config=configs/stage2.py",
         f"--workdir=/tmp/w/{name}", f"--config.data.synthetic_dir={data}",
         "--config.train.steps=1000", "--config.train.log_every=1", "--config.eval.batches=0",
         "--config.data.num_workers=2", "--logtostderr", *flags]
  job = {"name": name, "cmd": cmd, "env": {**ENV, "CUDA_VISIBLE_DEVICES": gpus},
         "stop": stop, "deadline_s": deadline}
  if fallback:
    job["fallback"] = fallback
  return job


L20 = ["--config.data.max_tokens=1048576", "--config.data.max_frames=7300"]
if which == "a":
  zero1 = ["--config.mesh.data=2", "--config.mesh.zero1=True", "--config.optim.global_batch=2"]
  fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.optim.global_batch=2"]
  phases = [[
      trainer("a_zero1_2gpu_2p19", "/tmp/d19", "0,1", *zero1, stop=4,
              fallback=trainer("a_fsdp_2gpu_2p19", "/tmp/d19", "0,1", *fsdp, stop=4)),
      trainer("a_1gpu_2p19", "/tmp/d19", "2", "--config.optim.global_batch=1", stop=4),
      trainer("b_1gpu_2p20", "/tmp/d20", "3", "--config.optim.global_batch=1", *L20, stop=2),
  ]]
else:
  seq = ["--config.mesh.data=1", "--config.mesh.seq=4", "--config.mesh.zero1=True",
         "--config.optim.global_batch=1", "--config.remat.l=16", "--config.remat.s=16384",
         "--config.remat.cell_saves=layers", "--config.optim.state_memory=host"]
  phases = [[trainer("b_seq4_2p20", "/tmp/d20", "0,1,2,3", *seq, *L20, stop=2,
                     fallback=trainer("b_seq4_2p19", "/tmp/d19", "0,1,2,3", *seq, stop=2))]]
json.dump({"phases": phases, "mem_fraction": frac, "total_mib": total}, open(path, "w"),
          indent=1)
print(f"spec {which}: memory fraction {frac} of {total} MiB per card")
