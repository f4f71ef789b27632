"""The measuring MA-GC planner on the tiny LM: what it compiles, caches, chooses and prints.

Three candidates of the tiny Mamba-2 (2 layers, T = 64, chunk 16; l = 1, s = auto: 16, 32
and 64 tokens per cell) are compiled once for the module (about 5-15 s each on CPU); every
test after that reads the cache, and counts that it compiles nothing more. Larger cells are
faster by the cost model and hold more activations, so each budget picks a different one.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import jax
import pytest

from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.remat import measure
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.xla_memory import tree_bytes

SEQLEN, BATCH, N_CANDIDATES = 64, 1, 3
CFG = mamba2_config("tiny", compute_dtype="float32", ssd_impl="xla")
L1_AUTO_S = RematSettings(l="1", s="auto", cell_saves="nothing", offload="none")


class CountingCompiles:
  """Wraps measure._compile_memory and records every candidate it compiles."""

  def __init__(self, monkeypatch):
    self.compiled = []
    real = measure._compile_memory

    def counting(lowered, layer_bytes, candidate):
      self.compiled.append(candidate)
      return real(lowered, layer_bytes, candidate)
    monkeypatch.setattr(measure, "_compile_memory", counting)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  """The cache file and its cache, the plan's rows (every candidate compiled), the compiles."""
  path = str(tmp_path_factory.mktemp("measure") / "cache.json")
  cache = measure.CompileCache(path)
  with pytest.MonkeyPatch.context() as mp:
    counter = CountingCompiles(mp)
    result = measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=None, batch=BATCH, cache=cache,
                          max_candidates=N_CANDIDATES, measure_all=True, show=False)
  return types.SimpleNamespace(path=path, cache=cache, rows=result.rows,
                               compiled=list(counter.compiled))


def _key(c):
  return (str(c.l), str(c.s), c.cell_saves, c.offload)


def table_rows(text):
  """{(l, s, cell_saves, offload): cells} of the candidate lines of a printed table."""
  out = {}
  for line in text.splitlines():
    cells = [v.strip() for v in line.split("|")]
    if len(cells) == 11 and cells[1].isdigit():
      out[tuple(cells[1:5])] = cells
  return out


def fastest_fitting(rows, budget):
  """The test's own reading of 'fastest': fewest cells, then the larger l."""
  fits = [r for r in rows if r.measured.device_bytes <= budget]
  if not fits:
    return None
  c = min(fits, key=lambda r: (math.ceil(CFG.n_layers / r.candidate.l)
                               * math.ceil(SEQLEN / r.candidate.s), -r.candidate.l)).candidate
  return c


def test_candidates_are_a_small_grid_around_the_model_optimum():
  cands = measure.candidates(mamba2_config("2.7b"), 2**19, max_candidates=12)
  assert 1 < len(cands) <= 12 and len(set(cands)) == len(cands)
  # The paper model's optimum (l=32, s=4608) seeds the grid; s moves to 4096, which divides
  # T (no last, shorter block outside the time scan). Fused blocks (the preset's default) run
  # remat/magc_fused.py without offload, where every extra layer group costs a copy of h:
  # one group (l = L) first; the autodiff block keeps the model's l first.
  assert cands[0] == measure.Candidate(64, 4096)
  autodiff = measure.candidates(mamba2_config("2.7b", block_impl="autodiff"), 2**19,
                                max_candidates=12)
  assert autodiff[0] == measure.Candidate(32, 4096)
  assert all(64 % c.l == 0 and c.s % 256 == 0 and 2**19 % c.s == 0 for c in cands)
  # Blocks that divide T when one is within a factor 1.5 of the wanted size, else the
  # nearest multiple of the chunk.
  assert measure._block_options(2**19, 256, 4608) == [4096, 8192, 2048, 16384]
  assert measure._block_options(100_000, 256, 4608) == [4608, 9216, 2304, 18432]
  assert measure._block_options(7 * 256, 256, 512) == [512, 1024, 256, 1792]
  both = measure.candidates(mamba2_config("2.7b"), 2**19, cell_saves="auto",
                            offload=["none", "sequence"], l="64", max_candidates=8)
  assert len(both) == 8 and {c.l for c in both} == {64}
  assert {(c.cell_saves, c.offload) for c in both} == {
      (saves, off) for saves in measure.AUTO_CELL_SAVES for off in ("none", "sequence")}
  with pytest.raises(ValueError, match="config.remat.offload='disk' is not one of"):
    measure.candidates(CFG, SEQLEN, offload="disk")
  with pytest.raises(ValueError, match="config.remat.s=20 must be a positive multiple"):
    measure.candidates(CFG, SEQLEN, s=20)


def test_cost_model_orders_recompute_then_offload_then_cells():
  C = measure.Candidate
  ordered = [C(64, 8192, "dots"), C(16, 4096, "nothing"), C(64, 16384, "nothing", "sequence"),
             C(64, 4096, "nothing", "all"), C(64, 16384, "layers"), C(64, 8192, "layers"),
             C(32, 16384, "layers"), C(16, 16384, "layers", "sequence")]
  keys = [measure.cost_key(c, 64, 2**19) for c in ordered]
  assert keys == sorted(keys) and len(set(keys)) == len(keys)
  # Equal numbers of cells: the larger l (fewer layer groups) first.
  assert measure.cost_key(C(64, 8192), 64, 2**19) < measure.cost_key(C(32, 4096 * 4), 64, 2**19)
  # The hand-written backward (remat/magc_fused.py) before remat/magc.py, whatever each
  # recomputes or offloads.
  assert (measure.cost_key(C(64, 8192, "layers"), 64, 2**19, hand_written=True)
          < measure.cost_key(C(64, 8192, "dots"), 64, 2**19))
  cfg = mamba2_config("2.7b")
  assert measure._hand_written(cfg, C(64, 8192, "layers"), 2**19)
  assert not measure._hand_written(cfg, C(64, 8192, "nothing", "sequence"), 2**19)
  assert not measure._hand_written(cfg.replace(block_impl="autodiff"), C(64, 8192), 2**19)


def test_measurement_reads_the_compiled_layers(measured):
  rows, compiled = measured.rows, measured.compiled
  assert sorted(compiled, key=str) == sorted((r.candidate for r in rows), key=str)
  assert len(rows) == N_CANDIDATES
  params = _layer_params()
  layer_bytes = tree_bytes(params)
  h_bytes = BATCH * SEQLEN * CFG.d_model * 4
  pointers = 8 * (len(jax.tree.leaves(params)) + 1)  # the output tuple's table of buffers
  for row in rows:
    m = row.measured
    # Arguments: the layers' parameters, h and the cotangent dh (not the unused embedding);
    # outputs: the parameters' gradients and dh_in, which takes the donated dh's buffer.
    assert m.param_bytes == m.grad_bytes == layer_bytes
    assert m.argument_bytes == layer_bytes + 2 * h_bytes
    assert 0 <= m.output_bytes - (layer_bytes + h_bytes) <= pointers
    assert m.alias_bytes == h_bytes
    assert 0 <= m.device_bytes - (m.temp_bytes + 2 * h_bytes) <= pointers
  # Larger cells keep more: else the budget tests below would prove nothing.
  assert [r.candidate.s for r in rows] == [64, 32, 16]  # in cost order
  sizes = [r.measured.device_bytes for r in rows]
  assert sizes[0] > sizes[1] > sizes[2]


def _layer_params():
  from flax import nnx
  from ma2mba_jax.models.mamba2 import Mamba2LM
  abstract = nnx.eval_shape(lambda: Mamba2LM(CFG, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))["layers"]


def test_auto_never_exceeds_its_budget(measured, monkeypatch):
  rows, cache = measured.rows, measured.cache
  counter = CountingCompiles(monkeypatch)
  sizes = sorted(r.measured.device_bytes for r in rows)
  # Every measured size, and just below each: at the largest everything fits, at the
  # smallest only the smallest candidate does.
  budgets = sizes + [b - 1 for b in sizes[1:]]
  choices = set()
  for budget in budgets:
    result = measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=budget, batch=BATCH,
                          cache=cache, max_candidates=N_CANDIDATES, show=False)
    chosen = next(r for r in rows if r.candidate == result.choice)
    assert chosen.measured.device_bytes <= budget
    assert result.choice == fastest_fitting(rows, budget)
    choices.add(result.choice)
  smallest = min(rows, key=lambda r: r.measured.device_bytes).candidate
  only_smallest = measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=sizes[0], batch=BATCH,
                               cache=cache, max_candidates=N_CANDIDATES, show=False)
  assert only_smallest.choice == smallest
  assert len(choices) == N_CANDIDATES  # each budget range has its own choice
  with pytest.raises(measure.NoPlanFitsError, match="no measured setting fits") as err:
    measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=sizes[0] - 1, batch=BATCH,
                 cache=cache, max_candidates=N_CANDIDATES, show=False)
  text = str(err.value)
  assert "offload" in text and "max_tokens" in text
  listed = table_rows(text)  # the error lists every setting it measured, none fitting
  assert {key for key in listed} == {_key(r.candidate) for r in rows}
  assert all(cells[-1] == "no" for cells in listed.values())
  assert counter.compiled == []  # all from the cache


def test_cache_avoids_a_second_compile(measured, monkeypatch):
  path, rows, compiled = measured.path, measured.rows, measured.compiled
  assert len(compiled) == N_CANDIDATES  # one compile per candidate for the fixture
  counter = CountingCompiles(monkeypatch)
  in_memory = measure.CompileCache()
  candidate = rows[0].candidate
  first = measure.measure(CFG, BATCH, SEQLEN, [candidate], cache=in_memory)
  again = measure.measure(CFG, BATCH, SEQLEN, [candidate], cache=in_memory)
  assert counter.compiled == [candidate] and in_memory.compiles == 1
  assert first == again
  on_disk = measure.CompileCache(path)  # a new process would read the same file
  (from_disk,) = measure.measure(CFG, BATCH, SEQLEN, [candidate], cache=on_disk)
  assert dataclasses.replace(from_disk, compile_s=0) == dataclasses.replace(first[0],
                                                                            compile_s=0)
  assert counter.compiled == [candidate]
  assert on_disk.compiles == 0
  # The key is a stable hash of what the memory depends on.
  key = measure.cache_key(CFG, BATCH, SEQLEN, candidate)
  assert key == measure.cache_key(mamba2_config("tiny", ssd_impl="xla"), BATCH, SEQLEN,
                                  dataclasses.replace(candidate))
  assert key != measure.cache_key(CFG, BATCH + 1, SEQLEN, candidate)
  assert key != measure.cache_key(CFG.replace(ssd_impl="pallas"), BATCH, SEQLEN, candidate)


def test_file_entry_of_another_program_is_measured_again(measured, monkeypatch, tmp_path):
  path, rows = measured.path, measured.rows
  stale = tmp_path / "stale.json"
  entries = json.loads(open(path).read())
  for entry in entries.values():  # as if written before the model's code changed
    entry["program"] = "0" * 64
  stale.write_text(json.dumps(entries))
  fake = dataclasses.replace(rows[0].measured, temp_bytes=1)
  compiled = []
  monkeypatch.setattr(measure, "_compile_memory",
                      lambda lowered, n, candidate: compiled.append(candidate) or fake)
  cache = measure.CompileCache(str(stale))
  assert measure.measure(CFG, BATCH, SEQLEN, [rows[0].candidate], cache=cache) == [fake]
  assert compiled == [rows[0].candidate] and cache.compiles == 1
  fresh = measure.CompileCache(str(stale))  # the new entry replaced the stale one
  assert measure.measure(CFG, BATCH, SEQLEN, [rows[0].candidate], cache=fresh) == [fake]
  assert compiled == [rows[0].candidate]


def test_table_lists_model_prediction_and_measurement(measured, capsys):
  budget = max(r.measured.device_bytes for r in measured.rows)
  result = measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=budget, batch=BATCH,
                        cache=measured.cache, max_candidates=N_CANDIDATES, measure_all=True)
  printed = capsys.readouterr().out
  assert printed.rstrip("\n") == result.table()
  k = MemoryConstants.from_model(CFG)
  assert "model MB" in printed.splitlines()[0] and "measured MB" in printed.splitlines()[0]
  listed = table_rows(printed)
  assert len(listed) == N_CANDIDATES
  for row in result.rows:
    c, m = row.candidate, row.measured
    predicted = magc_memory(CFG.n_layers, SEQLEN, c.l, c.s, k, c.offload) * 4 * BATCH
    assert row.predicted_bytes == predicted
    cells = listed[_key(c)]
    assert cells[6] == f"{predicted / 1e6:.3f}" and cells[7] == f"{m.device_bytes / 1e6:.3f}"
    assert cells[0] == ("*" if c == result.choice else "") and cells[-1] == "yes"


def test_budget_from_device_memory():
  gb = measure.GB
  budget = measure.training_budget_bytes(weight_bytes=10 * gb, grad_bytes=10 * gb,
                                         opt_state_bytes=20 * gb, device_bytes=80 * gb,
                                         margin_frac=0.1)
  assert budget == pytest.approx(80 * gb * 0.9 - 40 * gb)
  assert measure.training_budget_bytes(weight_bytes=1, grad_bytes=1, opt_state_bytes=1,
                                       device_bytes=80 * gb, budget_gb=30.0) == 30 * gb
  with pytest.raises(measure.NoPlanFitsError, match="nothing is left for activations"):
    measure.training_budget_bytes(weight_bytes=40 * gb, grad_bytes=20 * gb,
                                  opt_state_bytes=20 * gb, device_bytes=80 * gb)
  if measure.device_memory_bytes() is None:  # CPU: no allocator limit, no budget
    assert measure.training_budget_bytes(weight_bytes=1, grad_bytes=1,
                                         opt_state_bytes=1) is None


def test_no_budget_is_the_model_choice_without_compiling(monkeypatch):
  counter = CountingCompiles(monkeypatch)
  auto = RematSettings(l="auto", s="auto", cell_saves="nothing", offload="none")
  result = measure.plan(mamba2_config("2.7b"), 2**19, auto, budget_bytes=None, show=False)
  assert counter.compiled == []
  # planner.plan_magc's optimum (32, 4608), s moved to 4096 (it divides T)
  assert (result.choice.l, result.choice.s) == (32, 4096)


def _cli(path, budget_bytes):
  return subprocess.run(
      [sys.executable, "-m", "ma2mba_jax.remat.measure", "--model=tiny", f"--tokens={SEQLEN}",
       "--l=1",
       f"--budget_gb={budget_bytes / 1e9!r}", "--compute_dtype=float32", "--ssd_impl=xla",
       f"--max_candidates={N_CANDIDATES}", f"--cache={path}"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


def test_cli_prints_the_plan(measured):
  rows = measured.rows
  budget = sorted(r.measured.device_bytes for r in rows)[1] + 100  # (the GB flag rounds)
  proc = _cli(measured.path, budget)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "model MB" in out and "measured MB" in out and len(table_rows(out)) == N_CANDIDATES
  assert f"compiled 0 of {N_CANDIDATES} measured settings" in out  # all from the cache file
  expected = fastest_fitting(rows, budget)
  assert expected == measure.Candidate(1, 32)
  assert "choice: l=1 s=32 cell_saves=nothing offload=none" in out


def test_a_setting_that_does_not_compile_is_never_chosen(monkeypatch):
  """XLA can refuse a setting (out of memory while compiling, or an internal error, as the
  H100 gave for one offload candidate at 2^19): the plan marks it and picks another."""
  real = measure._compiler_options
  calls = []

  def failing_first(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise jax.errors.JaxRuntimeError("INTERNAL: refused on purpose by the test")
    return real(*args, **kwargs)
  monkeypatch.setattr(measure, "_compiler_options", failing_first)
  result = measure.plan(CFG, SEQLEN, L1_AUTO_S, budget_bytes=1e12, batch=BATCH,
                        cache=measure.CompileCache(), max_candidates=N_CANDIDATES, show=False)
  first, chosen = result.rows[0], result.choice
  assert first.measured.failed.startswith("INTERNAL: refused on purpose")
  assert first.fits is False and math.isinf(first.measured.device_bytes)
  assert chosen != first.candidate and chosen == result.rows[1].candidate
  assert "compile failed" in result.table()
