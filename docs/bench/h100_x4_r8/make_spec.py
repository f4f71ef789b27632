"""Writes drive.py's spec for call.sh: phase `c` (GPU 0: the stage-2 defaults on one GPU;
GPUs 1,2: ZeRO-1 on 2 GPUs, at once) or `e` (the stage-2 defaults on a one-GPU machine).

  python docs/bench/h100_x4_r8/make_spec.py c|e DEADLINE_S SPEC.json

Every command is the real trainer entry with the stage-2 defaults (524,288 tokens a sample,
`remat` and `optim.state_memory` auto), memory fraction $MEM_FRACTION (call.sh: launch/*.sh's
0.95 of an 80 GB H100, scaled down on larger cards).
"""
import json
import os
import sys

which, deadline, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ["MEM_FRACTION"]}


def trainer(name, gpus, *flags, stop=4):
  cmd = ["python", "-m", "ma2mba_jax.main", "--config=configs/stage2.py",
         f"--workdir=/tmp/w/{name}", "--config.data.synthetic_dir=/tmp/d19",
         "--config.train.steps=1000", "--config.train.log_every=1", "--config.eval.batches=0",
         "--config.data.num_workers=2", "--logtostderr", *flags]
  return {"name": name, "cmd": cmd, "env": {**ENV, "CUDA_VISIBLE_DEVICES": gpus},
          "stop": stop, "deadline_s": deadline}


if which == "c":
  phases = [[
      trainer("c_1gpu_2p19", "0", "--config.optim.global_batch=1"),
      trainer("c_zero1_2gpu_2p19", "1,2", "--config.mesh.data=2", "--config.mesh.zero1=True",
              "--config.optim.global_batch=2"),
  ]]
else:
  phases = [[trainer("e_1gpu_2p19", "0", "--config.optim.global_batch=1")]]
json.dump({"phases": phases, "mem_fraction": ENV["XLA_PYTHON_CLIENT_MEM_FRACTION"]},
          open(path, "w"), indent=1)
print(f"spec {which}: {[j['name'] for p in phases for j in p]}")
