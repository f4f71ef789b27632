"""The MA-GC memory model (paper Eqs. 4 and 12-16) and the choice of (l, s).

Practical model, in elements, for L layers, S tokens, l layers per group, s tokens per block:

    M(l, s) = (L*S/l) * C_L        layer checkpoints: each group's input, every token
            + (L*S/s) * C_S        sequence checkpoints: every layer's states, every block
            + l*s     * C_grid     one cell's activations during its backward
            + s       * C_state    a block's state workspace

with constants derived from the Mamba-2 config (the paper's Table 7 values follow):
C_L = d_model, C_S = d_inner*d_state + 3*conv_dim, C_grid = d_in_proj + d_inner,
C_state = d_inner*d_state + conv_dim. s is a multiple of the SSD chunk length; (l, s) are
chosen by brute force, as the paper does, optionally under a memory budget.

Beyond the paper, checkpoints offloaded to host memory (`remat.offload`, remat/cells.py)
leave the device-memory model: `sequence` drops the C_S term, `all` also the C_L term.

Under a `seq` mesh axis of n devices, S is one device's piece; with s < S the layer groups
run as a wavefront over the devices (remat/pipeline.py), which stacks each group's
checkpoints over its ticks: G + n - 1 ticks for the G full groups of l layers (n - 1 idle,
their stack entries zeros) and n more for a last group of r = L mod l layers. Per device:

    layer checkpoints       (G + n - 1 + n [r > 0]) * S * C_L
    sequence checkpoints    ((G + n - 1) * l + n * r) * (S/s) * C_S

which is the paper's two terms at n = 1 (`pipeline_devices`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ma2mba_jax.remat.cells import LAYER_CHECKPOINT, OFFLOAD_CHOICES, SEQUENCE_CHECKPOINT


@dataclasses.dataclass(frozen=True)
class MemoryConstants:
  """Per-element constants of the memory model (Table 7)."""
  c_layer: int    # C_L
  c_seq: int      # C_S
  c_grid: int     # C_grid
  c_state: int    # C_state

  @classmethod
  def from_model(cls, cfg: Any) -> "MemoryConstants":
    """From a Mamba-2 config (needs d_model, d_inner, d_state, conv_dim, d_in_proj)."""
    return cls(c_layer=cfg.d_model,
               c_seq=cfg.d_inner * cfg.d_state + 3 * cfg.conv_dim,
               c_grid=cfg.d_in_proj + cfg.d_inner,
               c_state=cfg.d_inner * cfg.d_state + cfg.conv_dim)


def magc_memory(n_layers: int, seqlen: int, l: int, s: int, k: MemoryConstants,
                offload: str = "none", pipeline_devices: int = 1) -> float:
  """Eq. 12-16 in elements of device memory (multiply by bytes per element for bytes).

  pipeline_devices: n, the devices of a `seq` mesh axis, `seqlen` then one device's piece;
  with s < seqlen the checkpoints are those of the wavefront (module docstring).
  """
  if offload not in OFFLOAD_CHOICES:
    raise ValueError(f"offload={offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
  if pipeline_devices < 1:
    raise ValueError(f"pipeline_devices={pipeline_devices} must be >= 1")
  on_host = OFFLOAD_CHOICES[offload]
  n = pipeline_devices if s < seqlen else 1    # one block a piece: no wavefront
  n_full, rest = divmod(n_layers, l)
  ticks_full = n_full + n - 1 if n_full else 0
  ticks_rest = n if rest else 0
  n_blocks = math.ceil(seqlen / s)
  layer_checkpoints = (0 if LAYER_CHECKPOINT in on_host
                       else (ticks_full + ticks_rest) * seqlen * k.c_layer)
  sequence_checkpoints = (0 if SEQUENCE_CHECKPOINT in on_host
                          else (ticks_full * l + ticks_rest * rest) * n_blocks * k.c_seq)
  return layer_checkpoints + sequence_checkpoints + l * s * k.c_grid + s * k.c_state


def ideal_memory(n_layers: int, seqlen: int) -> float:
  """Eq. 4 at its optimum l = s = (L*S)^(1/3): M* = 3 (L*S)^(2/3), in units of one element."""
  return 3.0 * (n_layers * seqlen) ** (2.0 / 3.0)


@dataclasses.dataclass(frozen=True)
class Plan:
  l: int
  s: int
  predicted_elements: float

  def predicted_bytes(self, bytes_per_element: int) -> float:
    return self.predicted_elements * bytes_per_element


def candidate_block_lengths(seqlen: int, chunk_len: int) -> list[int]:
  """s in chunk_len, 2*chunk_len, ... up to the first multiple covering the sequence."""
  top = max(chunk_len, math.ceil(seqlen / chunk_len) * chunk_len)
  return list(range(chunk_len, top + 1, chunk_len))


def plan_magc(n_layers: int, seqlen: int, constants: MemoryConstants, *, chunk_len: int,
              budget_elements: float | None = None, divisors_only: bool = True,
              offload: str = "none", pipeline_devices: int = 1) -> Plan:
  """Chooses (l, s).

  With `divisors_only`, l ranges over the divisors of L: then the layer groups are a free
  reshape of the stacked parameters and their gradients, where a ragged last group costs
  parameter-sized copies that the model above does not count (measured: 8 GB for the
  2.7B model).

  Without a budget: the (l, s) of least predicted memory. With a budget: among the (l, s)
  that fit, the one with the largest cells (fewest, largest kernel calls; ties: least
  memory). Raises ValueError when nothing fits, naming the smallest achievable memory.
  `offload` counts only what stays on the device, `pipeline_devices` the wavefront's
  checkpoints under a seq axis (`seqlen` one device's piece; see magc_memory).
  """
  if n_layers < 1 or seqlen < 1 or chunk_len < 1:
    raise ValueError(f"plan_magc: need n_layers, seqlen, chunk_len >= 1, got "
                     f"{n_layers}, {seqlen}, {chunk_len}")
  best: Plan | None = None
  best_fit: Plan | None = None
  for s in candidate_block_lengths(seqlen, chunk_len):
    for l in range(1, n_layers + 1):
      if divisors_only and n_layers % l:
        continue
      m = magc_memory(n_layers, seqlen, l, s, constants, offload, pipeline_devices)
      plan = Plan(l, s, m)
      if best is None or m < best.predicted_elements:
        best = plan
      if budget_elements is not None and m <= budget_elements:
        key = (l * min(s, seqlen), -m)
        if best_fit is None or key > (best_fit.l * min(best_fit.s, seqlen),
                                      -best_fit.predicted_elements):
          best_fit = plan
  assert best is not None
  if budget_elements is None:
    return best
  if best_fit is None:
    raise ValueError(f"plan_magc: no (l, s) fits the budget of {budget_elements:.3e} elements "
                     f"for L={n_layers}, S={seqlen}; the smallest is "
                     f"{best.predicted_elements:.3e} at l={best.l}, s={best.s}")
  return best_fit
