"""Stage 2, long-video knowledge: everything trains on SceneWalk-style long videos with
dense scene captions (paper: LLM lr 4e-5, vision lr 4e-6, global batch 32).

  python -m ma2mba_jax.main --config=configs/stage2.py:model=3.1b --workdir=runs/stage2 \
      --config.init_from=runs/stage1

On one 80 GB GPU at max_tokens 524,288 the defaults (remat and optim.state_memory 'auto')
keep the AdamW state in host memory and plan MA-GC by measurement; with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (launch/single_gpu.sh) and one sample a step the full
3.1B step runs on an H100 (BENCHMARKS.md, "The README's figures rerun": 72.7 s and 60.4 GiB a
step with l=64 s=8192 cell_saves=nothing, no offload, 2026-11-27). One GPU
with global_batch 32 accumulates over 32 micro-batches (an f32 gradient accumulator more).
"""

from configs import common


def get_config(arg: str | None = None):
  return common.get_base_config(2, arg)
