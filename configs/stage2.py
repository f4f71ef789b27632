"""Stage 2, long-video knowledge: everything trains on SceneWalk-style long videos with
dense scene captions (paper: LLM lr 4e-5, vision lr 4e-6, global batch 32).

  python -m ma2mba_jax.main --config=configs/stage2.py:model=3.1b --workdir=runs/stage2 \
      --config.init_from=runs/stage1
"""

from configs import common


def get_config(arg: str | None = None):
  return common.get_base_config(2, arg)
