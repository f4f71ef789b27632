"""Stage 3, supervised fine-tuning on video QA, several QA pairs of a video packed into one
sample (paper: LLaVA-Video-178K + NeXT-QA + ActivityNetQA + PerceptionTest; lr 4e-5 / 4e-6,
global batch 32).

  python -m ma2mba_jax.main --config=configs/stage3.py:model=3.1b --workdir=runs/stage3 \
      --config.init_from=runs/stage2
"""

from configs import common


def get_config(arg: str | None = None):
  return common.get_base_config(3, arg)
