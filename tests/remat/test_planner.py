"""The MA-GC memory model and planner: the paper's terms, offloaded terms, budgets."""

import math
import types

import pytest

from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat import magc
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory, plan_magc

CFG_27B = mamba2_config("2.7b")
K = MemoryConstants.from_model(CFG_27B)
L, S = CFG_27B.n_layers, 2**19


def test_terms_add_up_and_offload_removes_them():
  l, s = 16, 4096
  layer = math.ceil(L / l) * S * K.c_layer
  sequence = L * math.ceil(S / s) * K.c_seq
  cell = l * s * K.c_grid + s * K.c_state
  assert magc_memory(L, S, l, s, K) == layer + sequence + cell
  assert magc_memory(L, S, l, s, K, "sequence") == layer + cell
  assert magc_memory(L, S, l, s, K, "all") == cell
  with pytest.raises(ValueError, match="offload='disk' is not one of"):
    magc_memory(L, S, l, s, K, "disk")


def test_plan_is_the_brute_force_minimum():
  plan = plan_magc(L, S, K, chunk_len=CFG_27B.chunk_len)
  assert L % plan.l == 0 and plan.s % CFG_27B.chunk_len == 0
  for l in (1, 2, 4, 8, 16, 32, 64):
    for s in range(256, 32768 + 1, 256):
      assert plan.predicted_elements <= magc_memory(L, S, l, s, K)


def test_offloaded_sequence_checkpoints_allow_smaller_blocks():
  on_device = plan_magc(L, S, K, chunk_len=256)
  offloaded = plan_magc(L, S, K, chunk_len=256, offload="sequence")
  # Without the L*S/s term nothing pushes s up: the smallest block wins.
  assert offloaded.s == 256 < on_device.s
  assert offloaded.predicted_elements < on_device.predicted_elements


def test_budget_picks_largest_cells_that_fit_and_explains_failure():
  budget = 30e9 / 2  # elements of bf16
  plan = plan_magc(L, S, K, chunk_len=256, budget_elements=budget)
  assert plan.predicted_elements <= budget
  with pytest.raises(ValueError, match="no \\(l, s\\) fits the budget"):
    plan_magc(L, S, K, chunk_len=256, budget_elements=1e6)


def test_resolve_keeps_explicit_values_and_checks_them():
  cfg = types.SimpleNamespace(l="64", s="16384", offload="sequence")
  l, s, predicted = magc.resolve(cfg, CFG_27B, S)
  assert (l, s) == (64, 16384)
  assert predicted == 2 * magc_memory(L, S, 64, 16384, K, "sequence")
  with pytest.raises(ValueError, match="config.remat.s=1000 must be a positive multiple"):
    magc.resolve(types.SimpleNamespace(l="auto", s="1000"), CFG_27B, S)
  with pytest.raises(ValueError, match="config.remat.offload='disk'"):
    magc.resolve(types.SimpleNamespace(l="auto", s="auto", offload="disk"), CFG_27B, S)
