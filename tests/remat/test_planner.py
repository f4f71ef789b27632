"""The MA-GC memory model and planner against facts that do not come from planner.py: the
paper's Table 7 constants, a value worked out by hand, the paper's measured memory, an
exhaustive search written independently, and monotonicity."""

import itertools
import math

import numpy as np
import pytest

from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat import magc
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory, plan_magc
from ma2mba_jax.remat.settings import RematSettings

CFG_27B = mamba2_config("2.7b")
K = MemoryConstants.from_model(CFG_27B)
L, S = CFG_27B.n_layers, 2**19


@pytest.mark.parametrize("preset,table7", [
    # The paper's Table 7 (elements): C_L, C_S, C_grid, C_state (shared/paper-notes.md).
    ("370m", (1024, 269_056, 6_432, 264_448)),
    ("1.3b", (2048, 537_344, 12_608, 528_640)),
    ("2.7b", (2560, 671_488, 15_696, 660_736)),
])
def test_constants_are_the_papers_table7(preset, table7):
  k = MemoryConstants.from_model(mamba2_config(preset))
  assert (k.c_layer, k.c_seq, k.c_grid, k.c_state) == table7


def test_one_value_worked_out_by_hand():
  """2.7B, S = 2^19, l = 16, s = 4096 (Eqs. 12-16, by hand from Table 7):
    layer checkpoints     64/16 groups * 524,288 tokens * 2,560    = 5,368,709,120
    sequence checkpoints  64 layers * 128 blocks * 671,488         = 5,500,829,696
    cell                  16 * 4,096 * 15,696                      = 1,028,653,056
    state workspace       4,096 * 660,736                          = 2,706,374,656
                                                            total  = 14,604,566,528
  """
  assert magc_memory(L, S, 16, 4096, K) == 14_604_566_528
  # Offloading the sequence checkpoints removes exactly that line; `all` leaves the cell.
  assert magc_memory(L, S, 16, 4096, K, "sequence") == 14_604_566_528 - 5_500_829_696
  assert magc_memory(L, S, 16, 4096, K, "all") == 1_028_653_056 + 2_706_374_656
  with pytest.raises(ValueError, match="offload='disk' is not one of"):
    magc_memory(L, S, 16, 4096, K, "disk")


def test_wavefront_checkpoints_worked_out_by_hand():
  """Under a seq axis of n devices (remat/pipeline.py) each group's checkpoints are stacked
  over its ticks. 2.7B, a piece of S = 2^17 tokens on each of n = 4 devices, s = 4096:
    l = 16: G = 4 groups, 4 + 3 = 7 ticks of 16 layers
      layer checkpoints     7 ticks * 131,072 * 2,560                  = 2,348,810,240
      sequence checkpoints  7 * 16 layers * 32 blocks * 671,488        = 2,406,612,992
    l = 24 (ragged: 2 groups of 24, then 16 layers in a second wavefront of n ticks):
      layer checkpoints     (2 + 3 + 4) ticks * 131,072 * 2,560        = 3,019,898,880
      sequence checkpoints  (5 * 24 + 4 * 16) layers * 32 * 671,488    = 3,953,721,344
  plus the cell (l * s * 15,696) and the state workspace (s * 660,736) as on one device.
  One block a piece (s = S) runs no wavefront: the one-device model."""
  piece, n, s = 2**17, 4, 4096
  cell = lambda l: l * s * K.c_grid + s * K.c_state
  assert magc_memory(L, piece, 16, s, K, pipeline_devices=n) == (
      2_348_810_240 + 2_406_612_992 + cell(16))
  assert magc_memory(L, piece, 24, s, K, pipeline_devices=n) == (
      3_019_898_880 + 3_953_721_344 + cell(24))
  # n = 1 is the paper's model; offload removes the same terms as on one device.
  assert magc_memory(L, piece, 16, s, K, pipeline_devices=1) == magc_memory(L, piece, 16, s, K)
  assert magc_memory(L, piece, 16, s, K, "all", pipeline_devices=n) == cell(16)
  assert (magc_memory(L, piece, 16, piece, K, pipeline_devices=n)
          == magc_memory(L, piece, 16, piece, K))
  with pytest.raises(ValueError, match="pipeline_devices=0"):
    magc_memory(L, piece, 16, s, K, pipeline_devices=0)


def test_plan_under_a_seq_axis_counts_the_wavefront():
  """The auto plan for a piece with the wavefront is the least-memory (l, s) of the
  pipelined model (the exhaustive search with pipeline_devices), and its memory is what
  magc.resolve reports; the one-device plan costs more once the wavefront's stacked
  checkpoints are counted."""
  piece, n = 2**17, 4
  best = min(((magc_memory(L, piece, l, s, K, pipeline_devices=n), l, s)
              for l in range(1, L + 1) if L % l == 0
              for s in range(CFG_27B.chunk_len, piece + 1, CFG_27B.chunk_len)))
  plan = plan_magc(L, piece, K, chunk_len=CFG_27B.chunk_len, pipeline_devices=n)
  assert (plan.predicted_elements, plan.l, plan.s) == best
  one_device = plan_magc(L, piece, K, chunk_len=CFG_27B.chunk_len)
  assert magc_memory(L, piece, one_device.l, one_device.s, K, pipeline_devices=n) > (
      one_device.predicted_elements)
  l, s, predicted = magc.resolve(RematSettings(l="auto", s="auto"), CFG_27B, piece,
                                 pipeline_devices=n)
  assert (l, s, predicted) == (plan.l, plan.s, 2 * plan.predicted_elements)


@pytest.mark.parametrize("log2_len,paper_gb", [(14, 4.2), (16, 10.5), (19, 42.2)])
def test_plan_is_below_the_papers_measured_memory(log2_len, paper_gb):
  """The model counts the activations it plans for, in bf16; the paper's measured MA-GC
  activation memory (2.7B, A100) also holds workspaces and fragmentation: the prediction
  must be below it but not far below (between 0.4x and 1x; today 0.85x, 0.74x, 0.61x)."""
  plan = plan_magc(L, 2**log2_len, K, chunk_len=CFG_27B.chunk_len)
  predicted_gb = plan.predicted_bytes(2) / 1e9
  assert 0.4 * paper_gb < predicted_gb < paper_gb, (plan, predicted_gb)


def _exhaustive_minimum(n_layers, seqlen, k, chunk_len, offload="none"):
  """Every (l, s) on a numpy grid, memory summed term by term; l over divisors of L."""
  ls = np.array([l for l in range(1, n_layers + 1) if n_layers % l == 0], np.float64)
  ss = np.arange(chunk_len, -(-seqlen // chunk_len) * chunk_len + 1, chunk_len,
                 dtype=np.float64)
  lg, sg = np.meshgrid(ls, ss, indexing="ij")
  mem = lg * sg * k.c_grid + sg * k.c_state
  if offload != "all":
    mem = mem + np.ceil(n_layers / lg) * seqlen * k.c_layer
  if offload == "none":
    mem = mem + n_layers * np.ceil(seqlen / sg) * k.c_seq
  return float(mem.min())


@pytest.mark.parametrize("preset,n_layers,seqlen", [
    ("tiny", 6, 1000), ("370m", 48, 20_000), ("2.7b", 64, 2**19), ("1.3b", 48, 3 * 2**15)])
@pytest.mark.parametrize("offload", ["none", "sequence", "all"])
def test_plan_is_the_exhaustive_minimum(preset, n_layers, seqlen, offload):
  cfg = mamba2_config(preset)
  k = MemoryConstants.from_model(cfg)
  plan = plan_magc(n_layers, seqlen, k, chunk_len=cfg.chunk_len, offload=offload)
  assert n_layers % plan.l == 0 and plan.s % cfg.chunk_len == 0
  assert plan.predicted_elements == magc_memory(n_layers, seqlen, plan.l, plan.s, k, offload)
  assert plan.predicted_elements == _exhaustive_minimum(n_layers, seqlen, k, cfg.chunk_len,
                                                        offload)


def test_memory_grows_with_length_and_depth():
  """More tokens or more layers never need less memory, for the plan and for any (l, s)."""
  lengths = [2**10, 3 * 2**10, 2**12, 2**14, 2**16, 2**19]
  planned = [plan_magc(L, n, K, chunk_len=256).predicted_elements for n in lengths]
  assert planned == sorted(planned) and len(set(planned)) == len(planned)
  depths = [16, 32, 48, 64]
  planned = [plan_magc(n, S, K, chunk_len=256).predicted_elements for n in depths]
  assert planned == sorted(planned) and len(set(planned)) == len(planned)
  for l, s in itertools.product((1, 4, 16), (256, 4096)):
    ms = [magc_memory(L, n, l, s, K) for n in lengths]
    assert ms == sorted(ms), (l, s)


def test_optimum_grows_like_the_two_thirds_power():
  """Eq. 4: at the optimum M ~ (L*S)^(2/3), so 8x the tokens costs about 4x the memory
  (the chunk grid and the C_state term bend it a little: between 3x and 5x)."""
  m1 = plan_magc(L, 2**15, K, chunk_len=256).predicted_elements
  m8 = plan_magc(L, 2**18, K, chunk_len=256).predicted_elements
  assert 3.0 < m8 / m1 < 5.0, m8 / m1


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
  # No other fitting (l, s) has a larger cell (l * s tokens-layers).
  for l in (d for d in range(1, L + 1) if L % d == 0):
    for s in range(256, S + 1, 256):
      if l * s > plan.l * plan.s:
        assert magc_memory(L, S, l, s, K) > budget, (l, s)
  # A larger budget never picks smaller cells.
  bigger = plan_magc(L, S, K, chunk_len=256, budget_elements=2 * budget)
  assert bigger.l * bigger.s >= plan.l * plan.s
  with pytest.raises(ValueError, match="no \\(l, s\\) fits the budget"):
    plan_magc(L, S, K, chunk_len=256, budget_elements=1e6)


def test_resolve_keeps_explicit_values_and_checks_them():
  cfg = RematSettings(l="64", s="16384", offload="sequence")
  l, s, predicted = magc.resolve(cfg, CFG_27B, S)
  assert (l, s) == (64, 16384)
  # bytes of bf16: 2 per element of the model (worked out as in the hand test above).
  layer = 1 * S * 2560
  cell = 64 * 16384 * 15_696 + 16384 * 660_736
  assert predicted == 2 * (layer + cell)
  with pytest.raises(ValueError, match="config.remat.s=1000 must be a positive multiple"):
    magc.resolve(RematSettings(l="auto", s="1000"), CFG_27B, S)
  with pytest.raises(ValueError, match="config.remat.offload='disk'"):
    magc.resolve(RematSettings(l="auto", s="auto", offload="disk"), CFG_27B, S)
