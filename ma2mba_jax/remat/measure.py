"""MA-GC planning by measurement: XLA's compiled memory of candidate (l, s, cell_saves, offload).

The paper's memory model (planner.py, Table 7 constants) counts checkpoints and one cell. XLA
keeps more beside them (parameter-sized gradient buffers per loop level, f32 copies of the
residual stream around the scans, whatever a block's autodiff saves: BENCHMARKS.md, issue
15; remat/magc_fused.py removes the first two for fused blocks without offload, 55.5 -> 39.6
GB at 2^19 for l=64 s=8192), so `auto` built on the model alone can pick a cell that does
not fit. Here each
candidate is lowered and compiled -- the forward and backward of the LM layers under MA-GC,
the very function the trainer runs (remat/lm.py `apply_layers_with_remat`), on abstract
parameters -- and `compiled.memory_analysis()` says what it needs. Nothing is executed.

    python -m ma2mba_jax.remat.measure --model=2.7b --tokens=524288 --budget_gb=40

Choice ("fastest", by a cost model, since nothing runs): among the candidates whose measured
device memory fits the budget, the one with the smallest `cost_key`, compared in order:
  0. the hand-written MA-GC backward (remat/magc_fused.py: fused blocks, no offload, l | L,
     s | T) before remat/magc.py: at 2^19 on an H100 (2.7B) it ran 13,024 tokens/s with
     `nothing`, magc.py's best 9,418 with `layers` and host offload (BENCHMARKS.md); its
     `layers` replays only each layer's in_proj beyond `nothing` (about a tenth more time, an
     estimate), so it stays ahead of magc.py whatever magc.py recomputes;
  1. forwards recomputed per cell (RECOMPUTED_FORWARDS: dots 0.5 < nothing = names 1 <
     layers 2): the backward of a cell replays its forward once, `layers` once more per layer,
     `dots` keeps the matmul outputs and replays only the elementwise work;
  2. offload: none < sequence < all (host copies are extra traffic: 0-11% slower at 2^19 in
     BENCHMARKS.md runs D/E);
  3. cells, ceil(L/l) * ceil(T/s): fewer, larger kernel calls and scan boundaries;
  4. larger l (fewer layer groups: fewer parameter-sized gradient buffers).
Candidates are compiled in that order and the first that fits wins (`measure_all` compiles
every candidate, for the table).

Measured "device bytes" = temp + arguments + outputs - aliased - the parameters (arguments)
- their gradients (outputs): what the step needs beyond weights and gradients, i.e. what
must fit the budget of `training_budget_bytes` (device memory less weights, gradients,
optimizer state and a margin). The input h [B, T, D] f32 and the cotangent dh_in that the
layers return count, as in the trainer they are activations; the incoming cotangent dh is
donated (the trainer frees it once read), so XLA may reuse it. Not measured: the embedding,
the head and its loss, the vision encoder (the margin is for them).

Compiles are cached per (model config, batch, length, candidate, backend, jax version), in
memory and optionally in a JSON file keyed by a sha256 of those; a file entry is used only
while the lowered program is the same (its sha256 is stored beside), so code changes are
measured again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging

from ma2mba_jax.remat import magc_fused
from ma2mba_jax.remat.cells import CELL_SAVES, OFFLOAD_CHOICES
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory, plan_magc
from ma2mba_jax.remat.settings import RematPolicy, RematSettings
from ma2mba_jax.xla_memory import tree_bytes

# config.remat.planner: how MA-GC's 'auto' settings are chosen.
PLANNERS = ("measure", "model")
# Bumped when what is measured changes, so that old disk-cache entries are not reused.
MEASURE_VERSION = 1
# Forwards a cell's backward replays, per cell_saves (see the module docstring). Through
# remat/magc_fused.py `layers` replays one forward plus each layer's in_proj (not two
# forwards); it still sorts after `nothing`, which is what the choice depends on.
RECOMPUTED_FORWARDS = {"dots": 0.5, "nothing": 1.0, "names": 1.0, "layers": 2.0}
OFFLOAD_RANK = {name: i for i, name in enumerate(OFFLOAD_CHOICES)}  # none, sequence, all
# What `cell_saves='auto'` / `offload='auto'` explore.
AUTO_CELL_SAVES = ("nothing", "layers")
AUTO_OFFLOAD = ("none", "sequence", "all")
# Of the device's memory, kept free for what is not measured (embedding, head and loss,
# vision encoder) and the allocator's fragmentation.
DEFAULT_MARGIN_FRAC = 0.1
GB = 1e9


class NoPlanFitsError(ValueError):
  """No measured candidate fits the memory budget."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One MA-GC setting: l layers x s tokens per cell, what a cell keeps, what goes to host."""
  l: int
  s: int
  cell_saves: str = "nothing"
  offload: str = "none"

  def __post_init__(self):
    if self.cell_saves not in CELL_SAVES:
      raise ValueError(f"cell_saves={self.cell_saves!r} is not one of {', '.join(CELL_SAVES)}")
    if self.offload not in OFFLOAD_CHOICES:
      raise ValueError(f"offload={self.offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")

  def remat_cfg(self, save_names: Sequence[str] = ()) -> RematSettings:
    return RematSettings(policy=RematPolicy.MAGC, l=self.l, s=self.s,
                         cell_saves=self.cell_saves, offload=self.offload,
                         save_names=tuple(save_names))


@dataclasses.dataclass(frozen=True)
class Measurement:
  """XLA's compiled memory of one candidate's forward+backward, in bytes."""
  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  host_bytes: int      # host temp + arguments + outputs - aliased (offloaded checkpoints)
  param_bytes: int     # of the arguments: the layers' parameters
  grad_bytes: int      # of the outputs: the layers' parameter gradients
  compile_s: float
  failed: str = ""     # XLA's error when this setting does not compile (it never fits)

  @property
  def device_bytes(self) -> float:
    """What the step needs on the device beyond weights and their gradients (inf when the
    setting did not compile)."""
    if self.failed:
      return math.inf
    return (self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes
            - self.param_bytes - self.grad_bytes)


def cost_key(candidate: Candidate, n_layers: int, seqlen: int,
             hand_written: bool = False) -> tuple:
  """Smaller is faster (module docstring): the hand-written backward (`hand_written`: the
  candidate runs remat/magc_fused.py), recompute, offload, number of cells, -l (the table
  prints the cells as the key's second to last entry)."""
  n_cells = math.ceil(n_layers / candidate.l) * math.ceil(seqlen / candidate.s)
  return (not hand_written, RECOMPUTED_FORWARDS[candidate.cell_saves],
          OFFLOAD_RANK[candidate.offload], n_cells, -candidate.l)


def _hand_written(model_cfg: Any, candidate: Candidate, seqlen: int) -> bool:
  """Whether this candidate runs remat/magc_fused.py (else remat/magc.py)."""
  return magc_fused.applies(model_cfg, candidate.remat_cfg(), model_cfg.n_layers, seqlen)


# --------------------------------------------------------------------------- candidates


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _options(value: Any, auto: Sequence[str], field: str, allowed: Sequence[str]) -> list[str]:
  """A config value ('auto', one name, or a list of names) -> the names to explore."""
  names = list(auto) if value == "auto" else [value] if isinstance(value, str) else list(value)
  for name in names:
    if name not in allowed:
      raise ValueError(f"config.remat.{field}={name!r} is not one of "
                       f"{', '.join(allowed)} (or 'auto')")
  return list(dict.fromkeys(names))


def _layer_options(n_layers: int, l0: int) -> list[int]:
  """l0 (a divisor of L), the next larger divisor, L itself, the next smaller divisor."""
  divs = _divisors(n_layers)
  i = divs.index(l0)
  return list(dict.fromkeys([l0] + divs[i + 1:i + 2] + [n_layers] + divs[max(0, i - 1):i]))


# A block that divides T is preferred within this factor of the wanted size: a last, shorter
# block runs outside the time scan with its own group-sized gradient buffers (H100, 2.7B at
# 2^19, l=64, layers/sequence: s=8192 measured 33.7 GB, s=9216 51.9 GB; BENCHMARKS.md).
DIVISOR_BLOCK_FACTOR = 1.5


def _block_options(seqlen: int, chunk: int, s0: int) -> list[int]:
  """Blocks near s0, 2*s0, s0/2 and 4*s0: multiples of the chunk no longer than the sequence
  needs, the nearest that divides the sequence when one is within DIVISOR_BLOCK_FACTOR."""
  top = max(chunk, math.ceil(seqlen / chunk) * chunk)
  dividing = [d * chunk for d in _divisors(seqlen // chunk)] if seqlen % chunk == 0 else []

  def fit(x):
    nearest = min(top, max(chunk, round(x / chunk) * chunk))
    if dividing:
      best = min(dividing, key=lambda d: abs(math.log(d / x)))
      if abs(math.log(best / x)) <= math.log(DIVISOR_BLOCK_FACTOR):
        return best
    return nearest
  return list(dict.fromkeys([fit(s0), fit(2 * s0), fit(s0 / 2), fit(4 * s0)]))


def _explicit(value: Any, field: str) -> int | None:
  if value == "auto":
    return None
  try:
    number = int(value)
    ok = number >= 1 and float(value) == number
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"config.remat.{field}={value!r} must be 'auto' or a positive integer")
  return number


def candidates(model_cfg: Any, seqlen: int, *, l: Any = "auto", s: Any = "auto",
               cell_saves: Any = "nothing", offload: Any = "none",
               max_candidates: int = 12) -> list[Candidate]:
  """The settings to measure, at most `max_candidates`.

  The paper model's optimum (l0, s0) with every checkpoint on the device seeds a grid: l
  among divisors of L near l0 (and L), s among chunk multiples near s0 (x2, /2, x4); the same
  grid for every offload choice (the model's own optimum with offload degenerates to the
  smallest block, the slowest), except that with offload, or with fused blocks (which
  without offload run remat/magc_fused.py), l = L comes first. An explicit l
  or s (an int or a numeric string) is the only value on its axis. cell_saves / offload:
  one name, a list, or 'auto' (AUTO_CELL_SAVES / AUTO_OFFLOAD). When the grid is larger
  than max_candidates, every (cell_saves, offload) pair keeps its points nearest the seed,
  in turn.
  """
  n_layers, chunk = model_cfg.n_layers, model_cfg.chunk_len
  fixed_l, fixed_s = _explicit(l, "l"), _explicit(s, "s")
  if fixed_l is not None and not 1 <= fixed_l <= n_layers:
    raise ValueError(f"config.remat.l={fixed_l} must be in 1..n_layers={n_layers}")
  if fixed_s is not None and fixed_s % chunk:
    raise ValueError(f"config.remat.s={fixed_s} must be a positive multiple of the SSD chunk "
                     f"length {chunk}")
  if max_candidates < 1:
    raise ValueError(f"max_candidates={max_candidates} must be >= 1")
  saves_list = _options(cell_saves, AUTO_CELL_SAVES, "cell_saves", CELL_SAVES)
  offload_list = _options(offload, AUTO_OFFLOAD, "offload", tuple(OFFLOAD_CHOICES))
  constants = MemoryConstants.from_model(model_cfg)
  seed = plan_magc(n_layers, seqlen, constants, chunk_len=chunk)
  ls = [fixed_l] if fixed_l is not None else _layer_options(n_layers, seed.l)
  ss = [fixed_s] if fixed_s is not None else _block_options(seqlen, chunk, seed.s)
  # With offload, one layer group (l = L) first: the sequence checkpoints are on the host,
  # and what stays on the device per extra group is its input h [B, T, D]; and XLA (jax
  # 0.11.2) does not compile offload with several groups at all (BENCHMARKS.md, issue 15
  # part 2), so l < L would spend the candidates on settings that fail.
  ls_offload = ls if fixed_l is not None else [n_layers] + [x for x in ls if x != n_layers]
  # Fused blocks without offload run remat/magc_fused.py, where each layer group past the
  # first costs a full copy of h [B, T, D] f32 (its layer checkpoint) and nothing shrinks
  # with l but the cell's replay: one group first there too.
  ls_none = ls_offload if getattr(model_cfg, "block_impl", None) == "fused" else ls

  def grid(ls):  # nearest the seed first: by the sum of the two positions in the lists
    return [(l_, s_) for _, _, l_, s_ in
            sorted((i + j, i, l_, s_) for i, l_ in enumerate(ls) for j, s_ in enumerate(ss))]
  per_pair = [[Candidate(l_, s_, saves, off)
               for l_, s_ in grid(ls_none if off == "none" else ls_offload)]
              for off in offload_list for saves in saves_list]
  out: list[Candidate] = []
  for rank in range(max(map(len, per_pair))):  # round robin over the (saves, offload) pairs
    for pair in per_pair:
      if rank < len(pair) and pair[rank] not in out and len(out) < max_candidates:
        out.append(pair[rank])
  return out


# --------------------------------------------------------------------------- measuring


def _plain(value: Any) -> Any:
  if isinstance(value, (bool, int, str)) or value is None:
    return value
  if isinstance(value, float):
    return repr(value)  # inf and nan as text
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return str(value)  # dtypes and the like


def cache_key(model_cfg: Any, batch: int, seqlen: int, candidate: Candidate,
              save_names: Sequence[str] = ()) -> str:
  """A stable sha256 of the settings the compiled memory depends on (the code is not in it:
  the disk cache also checks a hash of the lowered program, see CompileCache)."""
  fields = {f.name: _plain(getattr(model_cfg, f.name)) for f in dataclasses.fields(model_cfg)}
  device = jax.devices()[0]
  payload = {"version": MEASURE_VERSION, "model": fields, "model_class": type(model_cfg).__name__,
             "batch": batch, "seqlen": seqlen, "candidate": dataclasses.asdict(candidate),
             "save_names": list(save_names), "backend": jax.default_backend(),
             "device_kind": device.device_kind, "jax": jax.__version__,
             "jaxlib": jaxlib.__version__}
  text = json.dumps(payload, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


class CompileCache:
  """Measurements by cache_key: in memory for this process and, with `path`, in a JSON file.

  A file entry also holds the sha256 of the lowered program (StableHLO text): a hit needs
  the same settings AND the same program, so an entry written before the model's code
  changed is measured again (a lowering costs seconds, a compile up to a minute). The file
  is read here, and merged and rewritten atomically after each new measurement.
  """

  def __init__(self, path: str | None = None):
    self.path = path
    self.compiles = 0  # measurements made (not found) through this cache
    self._memory: dict[str, Measurement] = {}
    self._file: dict[str, dict] = {}
    if path and os.path.exists(path):
      with open(path) as f:
        self._file = json.load(f)

  def get(self, key: str) -> Measurement | None:
    """This process's measurement for `key`."""
    return self._memory.get(key)

  def get_file(self, key: str, program_hash: str) -> Measurement | None:
    entry = self._file.get(key)
    if entry is None or entry.get("program") != program_hash:
      return None
    return Measurement(**entry["measurement"])

  def put(self, key: str, program_hash: str, measurement: Measurement) -> None:
    self._memory[key] = measurement
    if not self.path or self._file.get(key, {}).get("program") == program_hash:
      return
    if os.path.exists(self.path):  # keep what another process wrote meanwhile
      with open(self.path) as f:
        self._file = {**json.load(f), **self._file}
    self._file[key] = {"program": program_hash, "measurement": dataclasses.asdict(measurement)}
    folder = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(self._file, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


def _compiler_options() -> dict | None:
  """On CPU, LLVM at -O0: it halves the compile and changes no buffer (what we read is the
  buffer assignment, made before code generation; checked on the tiny LM). Other backends
  compile as the trainer does."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _lower(model_cfg: Any, batch: int, seqlen: int, candidate: Candidate,
           save_names: Sequence[str]) -> tuple[Any, int]:
  """The layers' forward+backward under `candidate`, lowered (traced, not compiled).

  Returns (lowered, bytes of the layers' parameters). The program is
  (layer params, h [B, T, D] f32, dh [B, T, D] f32) -> (d layer params, dh_in): the head's
  cotangent in, the vision/embedding's cotangent out, as in the trainer's step.
  """
  from flax import nnx

  from ma2mba_jax.models.mamba2 import Mamba2LM
  from ma2mba_jax.remat.lm import apply_layers_with_remat

  abstract = nnx.eval_shape(lambda: Mamba2LM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  params = nnx.to_pure_dict(state)
  layers = params["layers"]
  rest = {k: v for k, v in params.items() if k != "layers"}
  remat_cfg = candidate.remat_cfg(save_names)

  def fwd_bwd(layers, h, dh):
    # The embedding and final norm only complete the module: unused, compiled away.
    unused = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)

    def layers_fn(layers, h):
      model = nnx.merge(graphdef, {**unused, "layers": layers})
      out, _ = apply_layers_with_remat(model, h, remat_cfg)
      return out
    _, vjp = jax.vjp(layers_fn, layers, h)
    return vjp(dh)

  h = jax.ShapeDtypeStruct((batch, seqlen, model_cfg.d_model), jnp.float32)
  # dh is donated: in the trainer its buffer is free once the backward has read it.
  return jax.jit(fwd_bwd, donate_argnums=2).lower(layers, h, h), tree_bytes(layers)


def _program_hash(lowered: Any) -> str:
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _compile_memory(lowered: Any, layer_bytes: int, candidate: Candidate) -> Measurement:
  """Compiles `lowered` (nothing runs) and reads XLA's memory analysis."""
  start = time.perf_counter()
  try:
    analysis = lowered.compile(compiler_options=_compiler_options()).memory_analysis()
  except jax.errors.JaxRuntimeError as err:
    # XLA may refuse a setting outright (out of memory while compiling, or an internal error
    # in a rarely used path such as host offload): that candidate cannot be chosen.
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
    logging.warning("MA-GC measure: %s did not compile: %s", candidate, first_line)
    return Measurement(0, 0, 0, 0, 0, layer_bytes, layer_bytes,
                       time.perf_counter() - start, failed=first_line)
  compile_s = time.perf_counter() - start
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis: "
                       f"use remat.planner='model'")
  host = lambda name: int(getattr(analysis, name, 0) or 0)
  return Measurement(
      temp_bytes=int(analysis.temp_size_in_bytes),
      argument_bytes=int(analysis.argument_size_in_bytes),
      output_bytes=int(analysis.output_size_in_bytes),
      alias_bytes=int(analysis.alias_size_in_bytes),
      host_bytes=(host("host_temp_size_in_bytes") + host("host_argument_size_in_bytes")
                  + host("host_output_size_in_bytes") - host("host_alias_size_in_bytes")),
      param_bytes=layer_bytes, grad_bytes=layer_bytes, compile_s=compile_s)


def _with_overrides(model_cfg: Any, compute_dtype: Any, ssd_impl: str | None) -> Any:
  changes = {}
  if compute_dtype is not None:
    changes["compute_dtype"] = compute_dtype
  if ssd_impl is not None:
    changes["ssd_impl"] = ssd_impl
  return model_cfg.replace(**changes) if changes else model_cfg


def measure(model_cfg: Any, batch: int, seqlen: int, candidate_list: Sequence[Candidate], *,
            compute_dtype: Any = None, ssd_impl: str | None = None,
            save_names: Sequence[str] = (), cache: CompileCache | None = None
            ) -> list[Measurement]:
  """Compiled memory of each candidate (cached). model_cfg: a Mamba2Config; compute_dtype and
  ssd_impl override its own."""
  model_cfg = _with_overrides(model_cfg, compute_dtype, ssd_impl)
  cache = cache if cache is not None else CompileCache()
  out = []
  for candidate in candidate_list:
    key = cache_key(model_cfg, batch, seqlen, candidate, save_names)
    measured = cache.get(key)
    if measured is None:
      lowered, layer_bytes = _lower(model_cfg, batch, seqlen, candidate, save_names)
      program = _program_hash(lowered)
      measured = cache.get_file(key, program)
      if measured is None:
        measured = _compile_memory(lowered, layer_bytes, candidate)
        cache.compiles += 1
        logging.info("MA-GC measure: %s -> %.3f GB device, %.3f GB host (compiled in %.1f s)",
                     candidate, measured.device_bytes / GB, measured.host_bytes / GB,
                     measured.compile_s)
      cache.put(key, program, measured)
    out.append(measured)
  return out


# --------------------------------------------------------------------------- budget


def device_memory_bytes() -> int | None:
  """The first device's allocator limit (`memory_stats()['bytes_limit']`), None if unknown."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def training_budget_bytes(*, weight_bytes: float, grad_bytes: float, opt_state_bytes: float,
                          device_bytes: float | None = None, budget_gb: float | None = None,
                          margin_frac: float = DEFAULT_MARGIN_FRAC) -> float | None:
  """Device bytes left for the LM layers' activations in a training step.

  budget_gb (remat.budget_gb), when set, is that budget itself and wins. Otherwise:
  device memory (`device_bytes`, default device_memory_bytes()) x (1 - margin_frac), less
  the weights, the gradients (the trainer's accumulator included when it has one) and the
  optimizer state; each in bytes per device. None when neither is known (CPU).
  """
  if budget_gb is not None:
    if budget_gb <= 0:
      raise ValueError(f"config.remat.budget_gb={budget_gb} must be > 0 (or None)")
    return budget_gb * GB
  if device_bytes is None:
    device_bytes = device_memory_bytes()
  if device_bytes is None:
    return None
  if not 0 <= margin_frac < 1:
    raise ValueError(f"margin_frac={margin_frac} must be in [0, 1)")
  fixed = weight_bytes + grad_bytes + opt_state_bytes
  budget = device_bytes * (1 - margin_frac) - fixed
  if budget <= 0:
    raise NoPlanFitsError(
        f"weights, gradients and optimizer state take {fixed / GB:.2f} GB of the device's "
        f"{device_bytes / GB:.2f} GB (less a {margin_frac:.0%} margin): nothing is left for "
        f"activations; shard them (config.mesh.fsdp) or train fewer parameters")
  return budget


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Row:
  candidate: Candidate
  cost: tuple
  predicted_bytes: float               # the paper's model (device memory), for `batch` rows
  measured: Measurement | None = None  # None: not compiled
  fits: bool | None = None


@dataclasses.dataclass
class MeasuredPlan:
  choice: Candidate
  rows: list[Row]
  budget_bytes: float | None
  note: str = ""

  def table(self) -> str:
    return format_table(self.rows, self.budget_bytes, self.choice)


def _unit(values: Sequence[float]) -> tuple[str, float]:
  top = max(values, default=0.0)
  return next(((name, size) for name, size in (("GB", GB), ("MB", 1e6)) if top >= size),
              ("KB", 1e3))


def format_table(rows: Sequence[Row], budget_bytes: float | None,
                 choice: Candidate | None = None) -> str:
  """One line per candidate, in cost order: the paper model's prediction beside the
  measured plan."""
  sizes = [r.predicted_bytes for r in rows] + [budget_bytes or 0.0]
  sizes += [r.measured.temp_bytes + r.measured.argument_bytes for r in rows if r.measured]
  unit, size = _unit(sizes)
  head = ["", "l", "s", "cell_saves", "offload", "cells", f"model {unit}", f"measured {unit}",
          f"temp {unit}", f"host {unit}", "fits"]
  lines = []
  for row in rows:
    c, m = row.candidate, row.measured
    fmt = lambda name: ("-" if m is None else "failed" if m.failed
                        else f"{getattr(m, name) / size:.3f}")
    fits = ("not compiled" if m is None else "no (compile failed)" if m.failed
            else "-" if row.fits is None else "yes" if row.fits else "no")
    lines.append(["*" if c == choice else "", str(c.l), str(c.s), c.cell_saves, c.offload,
                  str(row.cost[-2]), f"{row.predicted_bytes / size:.3f}", fmt("device_bytes"),
                  fmt("temp_bytes"), fmt("host_bytes"), fits])
  widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
  out = [" | ".join(h.rjust(w) for h, w in zip(head, widths)),
         "-+-".join("-" * w for w in widths)]
  out += [" | ".join(v.rjust(w) for v, w in zip(r, widths)) for r in lines]
  budget = "none" if budget_bytes is None else f"{budget_bytes / size:.3f} {unit}"
  out.append(f"budget: {budget}; * chosen; model: the paper's memory model (Table 7); "
             f"measured: XLA's compiled device memory beyond weights and gradients")
  return "\n".join(out)


def plan(model_cfg: Any, seqlen: int, remat_cfg: RematSettings, *, budget_bytes: float | None,
         batch: int = 1, cache: CompileCache | None = None, max_candidates: int = 12,
         measure_all: bool = False, show: bool = True) -> MeasuredPlan:
  """The fastest MA-GC setting whose measured memory fits `budget_bytes`.

  remat_cfg: l, s ('auto' or ints), cell_saves, offload (a name, a list or 'auto'),
  save_names. model_cfg: the LM's Mamba2Config (its compute_dtype and ssd_impl are used).
  With no budget the paper model's optimum (the least offload first) is returned, compiled
  only with measure_all, for the table. Raises NoPlanFitsError, listing what was measured,
  when no candidate fits. `show` prints the table on stdout.
  """
  n_layers = model_cfg.n_layers
  itemsize = jnp.dtype(model_cfg.compute_dtype).itemsize
  constants = MemoryConstants.from_model(model_cfg)
  save_names = remat_cfg.save_names
  cands = candidates(model_cfg, seqlen, l=remat_cfg.l, s=remat_cfg.s,
                     cell_saves=remat_cfg.cell_saves, offload=remat_cfg.offload,
                     max_candidates=max_candidates)
  rows = sorted((Row(c, cost_key(c, n_layers, seqlen, _hand_written(model_cfg, c, seqlen)),
                     magc_memory(n_layers, seqlen, c.l, c.s, constants, c.offload)
                     * itemsize * batch) for c in cands), key=lambda r: r.cost)
  choice = None
  if budget_bytes is not None or measure_all:
    for row in rows:
      if choice is not None and not measure_all:
        break
      (row.measured,) = measure(model_cfg, batch, seqlen, [row.candidate],
                                save_names=save_names, cache=cache)
      if budget_bytes is not None:
        row.fits = row.measured.device_bytes <= budget_bytes
        if row.fits and choice is None:
          choice = row.candidate
  if budget_bytes is None:
    # Nothing to fit: the model's optimum among the candidates, as planner='model' picks.
    # cell_saves='nothing' (the least memory per cell) when 'auto' leaves it open.
    best = min(rows, key=lambda r: (OFFLOAD_RANK[r.candidate.offload], r.predicted_bytes,
                                    r.candidate.cell_saves != "nothing", r.cost))
    result = MeasuredPlan(best.candidate, rows, None,
                          note="no memory budget known: the paper model's choice")
  elif choice is None:
    raise NoPlanFitsError(
        f"MA-GC: no measured setting fits the budget of {budget_bytes / GB:.3f} GB for "
        f"{n_layers} layers x {seqlen} tokens x {batch} rows:\n"
        f"{format_table(rows, budget_bytes)}\n"
        f"Allow host offload (config.remat.offload='sequence', 'all' or 'auto'), "
        f"cell_saves='layers', a shorter config.data.max_tokens or a larger "
        f"config.remat.budget_gb (remat.planner='model' skips the measurement).")
  else:
    result = MeasuredPlan(choice, rows, budget_bytes)
  logging.info("MA-GC plan (%s):\n%s", result.note or "measured", result.table())
  if show:
    print(result.table(), flush=True)
  return result


# --------------------------------------------------------------------------- command line


def _flags():
  from absl import flags
  return dict(
      model=flags.DEFINE_string("model", "2.7b", "Mamba-2 preset (models/presets.py)."),
      tokens=flags.DEFINE_integer("tokens", 524288, "Sequence length T."),
      batch=flags.DEFINE_integer("batch", 1, "Rows per device per forward (micro_batch)."),
      budget_gb=flags.DEFINE_float("budget_gb", None, "Activation budget in GB; default: the "
                                   "device memory less LM weights, gradients, AdamW state "
                                   "and the margin."),
      device_gb=flags.DEFINE_float("device_gb", None, "Device memory to plan for, in GB; "
                                   "default: this device's bytes_limit."),
      opt_bytes=flags.DEFINE_integer("opt_bytes_per_param", 8, "Optimizer state bytes per "
                                     "parameter on the device (AdamW: 8 with float32 moments, 4 "
                                     "with optim.moments_dtype=bfloat16, 0 with "
                                     "optim.state_memory=host)."),
      margin=flags.DEFINE_float("margin", DEFAULT_MARGIN_FRAC, "Fraction of device memory "
                                "kept free."),
      l=flags.DEFINE_string("l", "auto", "Layers per group, or auto."),
      s=flags.DEFINE_string("s", "auto", "Tokens per block, or auto."),
      cell_saves=flags.DEFINE_list("cell_saves", ["nothing"], "Names, or auto."),
      offload=flags.DEFINE_list("offload", ["none"], "Names, or auto."),
      compute_dtype=flags.DEFINE_string("compute_dtype", "bfloat16", "Compute dtype."),
      ssd_impl=flags.DEFINE_string("ssd_impl", "auto", "SSD backend."),
      max_candidates=flags.DEFINE_integer("max_candidates", 12, "Settings compiled at most."),
      measure_all=flags.DEFINE_bool("measure_all", True, "Compile every candidate (else stop "
                                    "at the first, fastest, that fits)."),
      cache=flags.DEFINE_string("cache", "", "JSON file of cached measurements."),
  )


def main(argv: Sequence[str], f: dict) -> None:
  del argv
  from ma2mba_jax.models.presets import mamba2_config
  model_cfg = mamba2_config(f["model"].value, compute_dtype=f["compute_dtype"].value,
                            ssd_impl=f["ssd_impl"].value)
  one = lambda v: v[0] if len(v) == 1 else v
  remat_cfg = RematSettings(l=f["l"].value, s=f["s"].value,
                            cell_saves=one(f["cell_saves"].value),
                            offload=one(f["offload"].value))
  from flax import nnx

  from ma2mba_jax.models.mamba2 import Mamba2LM
  abstract = nnx.eval_shape(lambda: Mamba2LM(model_cfg, rngs=nnx.Rngs(0)))
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  weight_bytes = tree_bytes(nnx.state(abstract, nnx.Param))
  device_gb = f["device_gb"].value
  budget = training_budget_bytes(
      weight_bytes=weight_bytes, grad_bytes=weight_bytes,
      opt_state_bytes=n_params * f["opt_bytes"].value,
      device_bytes=None if device_gb is None else device_gb * GB,
      budget_gb=f["budget_gb"].value, margin_frac=f["margin"].value)
  cache = CompileCache(f["cache"].value or None)
  print(f"Mamba-2 {f['model'].value}: {n_params:,} parameters ({weight_bytes / GB:.2f} GB), "
        f"T={f['tokens'].value}, batch {f['batch'].value}, {model_cfg.compute_dtype}, "
        f"ssd_impl={model_cfg.ssd_impl}, backend {jax.default_backend()}")
  source = ("--budget_gb" if f["budget_gb"].value is not None else
            "none known (no --device_gb, no device bytes_limit)" if budget is None else
            "device memory less weights, gradients, optimizer state and margin")
  print("activation budget: " + (f"{budget / GB:.3f} GB, " if budget else "") + source)
  try:
    result = plan(model_cfg, f["tokens"].value, remat_cfg, budget_bytes=budget,
                  batch=f["batch"].value, cache=cache, max_candidates=f["max_candidates"].value,
                  measure_all=f["measure_all"].value, show=True)
  except NoPlanFitsError as err:
    print(err)
    print(f"compiled {cache.compiles} settings (the rest from the cache)")
    raise SystemExit(1) from None
  measured = sum(r.measured is not None for r in result.rows)
  print(f"compiled {cache.compiles} of {measured} measured settings (the rest from the cache)")
  c = result.choice
  print(f"choice: l={c.l} s={c.s} cell_saves={c.cell_saves} offload={c.offload}"
        + (f" ({result.note})" if result.note else ""))


if __name__ == "__main__":
  from absl import app
  _FLAGS = _flags()
  app.run(lambda argv: main(argv, _FLAGS))
