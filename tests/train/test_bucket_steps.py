"""StepPerLength (issue 17's length buckets): one plan and one built step per batch length,
reused. The real trainer's per-bucket plans: tests/train/test_packing_trainer.py
(test_trainer_with_length_buckets)."""

import numpy as np

from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train import bucket_steps


class _Batch:
  def __init__(self, length):
    self.tokens = np.zeros((1, length), np.int32)


def test_one_plan_and_one_build_per_length():
  planned, built = [], []

  def plan(tokens):
    planned.append(tokens)
    return RematSettings(l=1, s=tokens // 2)

  def build(remat_cfg):
    built.append(remat_cfg)
    return lambda state, batch: (state + 1, remat_cfg.s)

  steps = bucket_steps.StepPerLength(build, plan, {128: RematSettings(l=2, s=32)})
  state, seen = 0, []
  for length in (32, 128, 32, 64, 128, 64, 32):
    state, s = steps(state, _Batch(length))
    seen.append(s)
  assert state == 7 and seen == [16, 32, 16, 32, 32, 32, 16]
  assert planned == [32, 64]                      # 128 was planned before the run
  assert [r.s for r in built] == [16, 32, 32]     # one build per length
  assert sorted(steps.plans) == [32, 64, 128]
