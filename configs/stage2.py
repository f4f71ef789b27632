"""Stage 2, long-video knowledge: everything trains on SceneWalk-style long videos with
dense scene captions (paper: LLM lr 4e-5, vision lr 4e-6, global batch 32).

  python -m ma2mba_jax.main --config=configs/stage2.py:model=3.1b --workdir=runs/stage2 \
      --config.init_from=runs/stage1

On one 80 GB GPU at max_tokens 524,288 the defaults (remat and optim.state_memory 'auto')
keep the AdamW state in host memory and plan MA-GC by measurement; with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (launch/single_gpu.sh) and one sample a step the full
3.1B step runs on an H100 (BENCHMARKS.md, issue 15 part 3: 104 s and 61.8 GiB a step with
the 64 x 4608 plan chosen then; the planner's grid has changed since). One GPU
with global_batch 32 accumulates over 32 micro-batches (an f32 gradient accumulator more).
"""

from configs import common


def get_config(arg: str | None = None):
  return common.get_base_config(2, arg)
