"""Typed remat settings: `config.remat` (configs/common.py, checked by
train/config_check.py) as one frozen value that the policies, the planners, the trainer and
the benchmarks pass around. The written contract: docs/remat.md, "Policies and the planner".

Before planning, MA-GC's `l` / `s` (and with planner=measure, `cell_saves` / `offload`) may
be 'auto'; the trainer's `resolved_remat` (or remat/magc.resolve, remat/measure.plan) turns
them into concrete values with `replace`, and the policies read only resolved ones.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class RematPolicy(enum.StrEnum):
  """What the forward keeps for the backward (remat/policies.py). A str: compares equal to
  its config spelling ('magc' == RematPolicy.MAGC)."""
  NONE = "none"      # everything
  LAYER = "layer"    # each layer's input
  SQRT = "sqrt"      # each group of about sqrt(L) layers' input
  MAGC = "magc"      # a grid of l layers x s tokens (multi-axis GC, remat/magc.py)


@dataclasses.dataclass(frozen=True)
class RematSettings:
  """config.remat, typed. Field meanings and allowed values: configs/common.py."""
  # The policy (a RematPolicy; its config string is accepted and converted).
  policy: RematPolicy = RematPolicy.MAGC
  # MA-GC layers per cell and tokens per cell: ints (or numbers in strings) or 'auto'.
  l: int | str = "auto"
  s: int | str = "auto"
  # What a cell keeps for its own backward: nothing | layers | dots | names (remat/cells.py);
  # before planning also 'auto' or several names to choose from (remat/measure.py).
  cell_saves: str | tuple[str, ...] = "nothing"
  # With cell_saves=names: the checkpoint_name tags to keep.
  save_names: tuple[str, ...] = ()
  # Checkpoints kept in host memory: none | sequence | all (remat/cells.py); before planning
  # also 'auto' or several to choose from.
  offload: str | tuple[str, ...] = "none"
  # Activation budget in GB for MA-GC's 'auto' (None: the device's memory, or the least).
  budget_gb: float | None = None
  # How MA-GC's 'auto' is chosen: measure (compiled candidates) | model (paper's Table 7).
  planner: str = "measure"

  def __post_init__(self):
    try:
      policy = RematPolicy(self.policy)
    except ValueError:
      raise ValueError(f"config.remat.policy={self.policy!r} is not one of "
                       f"{', '.join(p.value for p in RematPolicy)}") from None
    object.__setattr__(self, "policy", policy)
    object.__setattr__(self, "save_names", tuple(self.save_names))
    for name in ("cell_saves", "offload"):  # lists (from a ConfigDict or flags) -> tuples
      value = getattr(self, name)
      if not isinstance(value, str):
        object.__setattr__(self, name, tuple(value))

  @classmethod
  def from_config(cls, remat: Mapping[str, Any]) -> RematSettings:
    """From config.remat (a ConfigDict or a dict); unset fields take the defaults above."""
    remat = remat.to_dict() if hasattr(remat, "to_dict") else dict(remat)
    unknown = set(remat) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.remat has unknown fields {sorted(unknown)}")
    return cls(**remat)

  def replace(self, **changes: Any) -> RematSettings:
    """A copy with `changes` (e.g. the resolved l and s)."""
    return dataclasses.replace(self, **changes)
