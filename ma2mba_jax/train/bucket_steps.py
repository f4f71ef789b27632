"""The train step per batch length, for length buckets (issue 17, data.bucket_lengths).

With buckets a batch is T tokens long for T one of a few bucket lengths (data/batching.py).
MA-GC's l and s (and, with the measuring planner, cell_saves / offload) that config.remat
leaves 'auto' are then planned for each T, not only for max_tokens: a short bucket can take
fewer, longer time blocks (or more layers a cell) than max_tokens needs. `StepPerLength`
plans a length the first time a batch of it comes, builds (jits) the step with that plan,
and keeps both: one plan and one compile per bucket length, their count logged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from absl import logging

from ma2mba_jax.remat.settings import RematSettings


def describe(remat_cfg: RematSettings) -> str:
  """'l=4 x s=64, cell_saves=nothing, offload=none' (MA-GC) or the policy's name."""
  if remat_cfg.policy != "magc":
    return f"policy={remat_cfg.policy.value}"
  return (f"l={remat_cfg.l} x s={remat_cfg.s}, cell_saves={remat_cfg.cell_saves}, "
          f"offload={remat_cfg.offload}")


class StepPerLength:
  """`step(state, batch)` dispatching on T = batch.tokens.shape[1] to a step built for T.

  build(remat_cfg) -> a jitted train step; plan(T) -> the remat settings for T tokens (the
  trainer's resolved_remat at that length). `planned` seeds the plans already made (the
  one for max_tokens, made before the run started).
  """

  def __init__(self, build: Callable[[RematSettings], Callable],
               plan: Callable[[int], RematSettings],
               planned: dict[int, RematSettings] | None = None):
    self._build, self._plan = build, plan
    self.plans: dict[int, RematSettings] = dict(planned or {})
    self._steps: dict[int, Callable] = {}

  def step_for(self, length: int) -> Callable:
    """The step for batches of `length` tokens (planned and built on first use)."""
    step = self._steps.get(length)
    if step is not None:
      return step
    remat_cfg = self.plans.get(length)
    if remat_cfg is None:
      # Planning may compile and measure candidates: no batch is in flight, and the
      # transfer guard around the training step is for the step's inputs only.
      with jax.transfer_guard("allow"):
        remat_cfg = self._plan(length)
      self.plans[length] = remat_cfg
    step = self._steps[length] = self._build(remat_cfg)
    logging.info("length bucket T=%d: %s; %d bucket step(s) so far (one plan and one "
                 "compile each)", length, describe(remat_cfg), len(self._steps))
    return step

  def __call__(self, state: Any, batch: Any) -> Any:
    return self.step_for(int(batch.tokens.shape[1]))(state, batch)
