"""Remat policies compared: activation memory and tokens/s of the Mamba-2 backbone, fwd+bwd.

  python -m ma2mba_jax.bench.remat --model=2.7b --policies=none,layer,sqrt,magc \
      --lengths=16384,65536,131072,524288 --json=bench_out/remat.json --png=bench_out/remat.png

Random weights (f32 master, bf16 compute), random tokens, loss = next-token cross-entropy
(computed in blocks, so the logits never exist whole). Each (policy, length) runs in a fresh
process, because the allocator's peak counter cannot be reset. Activation memory is measured
as the paper does: peak device memory minus the memory after parameters and gradients are
allocated (gradients counted as one parameter-sized f32 tree). On CPU, where the allocator
keeps no statistics, XLA's compiled temp size is reported instead. OOM is a result, not a
crash. The paper's Table 3 (A100, 2.7B) is printed beside. tokens/s is from the median of
the `--repeats` steps after the first.

Memory per token and layer (`--block_impl=fused|autodiff`, models/fused_block.py): each row
reports XLA's compiled temp over layers x tokens (an upper bound: the backward's working set
is in it), and with `--marginal` the bytes of one more layer per token, from a compile (not
a run) of the same row with half the layers (policy `none` only).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "2.7b", "Mamba-2 preset (models/presets.py).")
_POLICIES = flags.DEFINE_list("policies", ["none", "layer", "sqrt", "magc"], "Remat policies.")
_LENGTHS = flags.DEFINE_list("lengths", ["16384", "65536"], "Sequence lengths (tokens).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_L = flags.DEFINE_string("l", "auto", "MA-GC layers per group (or auto).")
_S = flags.DEFINE_string("s", "auto", "MA-GC tokens per time block (or auto).")
_CELL_SAVES = flags.DEFINE_string("cell_saves", "nothing", "nothing | layers | dots | names.")
_OFFLOAD = flags.DEFINE_enum("offload", "none", ["none", "sequence", "all", "auto"],
                             "Checkpoints kept in host memory (remat/cells.py).")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "auto", "SSD backend.")
_PLANNER = flags.DEFINE_enum("planner", "model", ["model", "measure"],
                             "How MA-GC's auto settings are chosen: the paper's memory model, "
                             "or compiled candidates measured against --budget_gb "
                             "(remat/measure.py; cell_saves/offload may then be auto).")
_BUDGET_GB = flags.DEFINE_float("budget_gb", None,
                                "planner=measure: activation budget in GB (default: the "
                                "device's memory less weights and gradients, less a margin).")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", 8,
                                       "planner=measure: settings compiled at most.")
_BLOCK_IMPL = flags.DEFINE_enum("block_impl", None, ["fused", "autodiff"],
                                "Mamba2Config.block_impl (default: the config's).")
_N_LAYERS = flags.DEFINE_integer("n_layers", None, "Override the preset's layer count.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Only compile and report XLA's memory analysis.")
_MARGINAL = flags.DEFINE_bool(
    "marginal", False, "Also compile (not run) each row with half the layers and report the "
    "bytes per token of one more layer: (temp(L) - temp(L/2)) / (L/2 * B * T).")
_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed steps after the compiled first run.")
_JSON = flags.DEFINE_string("json", None, "Write results here.")
_PNG = flags.DEFINE_string("png", None, "Plot memory against length here.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one 'policy:length' and print JSON.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds allowed per (policy, length).")

# Paper Table 3 / Section 5 (A100 80 GB, 2.7B, BF16): activation GB by length.
PAPER_GB = {
    "none": {2**10: 2.7, 2**11: 5.4, 2**12: 10.7, 2**13: 21.4, 2**14: 42.6},
    "layer": {2**14: 17.4},
    "sqrt": {2**14: 8.7},
    "magc": {2**10: 0.7, 2**11: 1.1, 2**12: 1.8, 2**13: 2.7, 2**14: 4.2, 2**15: 6.9,
             2**16: 10.5, 2**17: 17.2, 2**18: 25.9, 2**19: 42.2},
}
PAPER_TOK_S = {"none": (2**14, 12168), "layer": (2**16, 8450), "sqrt": (2**17, 8618),
               "magc": (2**19, 7914)}


def run_one(policy: str, seqlen: int) -> dict:
  """Builds the backbone, measures one (policy, length) in this process."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ma2mba_jax.bench import common
  from ma2mba_jax.models.mamba2 import Mamba2LM
  from ma2mba_jax.models.presets import mamba2_config
  from ma2mba_jax.remat import magc
  from ma2mba_jax.remat.lm import apply_layers_with_remat
  from ma2mba_jax.remat.settings import RematSettings
  from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets

  overrides = dict(compute_dtype=_DTYPE.value, ssd_impl=_SSD_IMPL.value)
  if _BLOCK_IMPL.value:
    overrides["block_impl"] = _BLOCK_IMPL.value
  if _N_LAYERS.value:
    overrides["n_layers"] = _N_LAYERS.value
  cfg = mamba2_config(_MODEL.value, **overrides)
  remat_cfg = RematSettings(policy=policy, l=_L.value, s=_S.value,
                            cell_saves=_CELL_SAVES.value, offload=_OFFLOAD.value)
  row = {"policy": policy, "T": seqlen, "batch": _BATCH.value, "offload": _OFFLOAD.value,
         "block_impl": cfg.block_impl, "n_layers": cfg.n_layers,
         "cell_saves": _CELL_SAVES.value}
  itemsize = jnp.dtype(_DTYPE.value).itemsize
  if policy == "magc" and _PLANNER.value == "measure":
    from ma2mba_jax.remat import measure
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0))))))
    budget = measure.training_budget_bytes(weight_bytes=4 * n_params, grad_bytes=4 * n_params,
                                           opt_state_bytes=0, budget_gb=_BUDGET_GB.value)
    plan_start = time.perf_counter()
    result = measure.plan(cfg, seqlen, remat_cfg, budget_bytes=budget, batch=_BATCH.value,
                          max_candidates=_MAX_CANDIDATES.value)
    choice = result.choice
    remat_cfg = remat_cfg.replace(l=choice.l, s=choice.s, cell_saves=choice.cell_saves,
                                  offload=choice.offload)
    row.update(l=choice.l, s=choice.s, cell_saves=choice.cell_saves, offload=choice.offload,
               planner="measure", budget_GB=None if budget is None else budget / 1e9,
               plan_s=time.perf_counter() - plan_start,
               plan_compiled=sum(r.measured is not None for r in result.rows))
  elif policy == "magc":
    l, s, predicted = magc.resolve(remat_cfg, cfg, seqlen, bytes_per_element=itemsize)
    remat_cfg = remat_cfg.replace(l=l, s=s)
    row.update(l=l, s=s, predicted_GB=predicted * _BATCH.value / 1e9)

  graphdef, params = nnx.split(nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.split(Mamba2LM(cfg, rngs=nnx.Rngs(0)))[1])()
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, seqlen), 0, cfg.vocab_size)
  mask = jnp.ones_like(tokens, dtype=bool)

  def loss(params, tokens):
    model = nnx.merge(graphdef, params)
    h, _ = apply_layers_with_remat(model, model.embed(tokens), remat_cfg)
    targets, weights = shift_targets(tokens, mask)
    total, count = blockwise_cross_entropy(h, model.head, targets, weights)
    return total / count

  grad_fn = jax.jit(jax.grad(loss))
  grads = None

  def one_step():
    nonlocal grads
    grads = None             # the previous step's gradients are freed before the next
    grads = compiled(params, tokens)
    return grads

  base = common.device_memory_stats().get("bytes_in_use")
  try:
    compiled = grad_fn.lower(params, tokens).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
      row["compiled_temp_GB"] = analysis.temp_size_in_bytes / 1e9
      # An upper bound on what is saved per token and layer: the whole plan (the backward's
      # working set and gradient buffers included) over layers x tokens.
      row["temp_per_token_layer_KB"] = (analysis.temp_size_in_bytes / 1e3
                                        / (cfg.n_layers * _BATCH.value * seqlen))
      host_temp = getattr(analysis, "host_temp_size_in_bytes", 0)
      if host_temp:
        row["host_temp_GB"] = host_temp / 1e9
    if _COMPILE_ONLY.value:
      return row
    times = common.time_steps(one_step, 1 + _REPEATS.value)
  except Exception as err:  # noqa: BLE001 - an OOM is a result
    return common.oom_row(err, row)
  # The median of the steps after the first (which may still pay for autotuning).
  timed = times[1:] or times
  step_s = statistics.median(timed)
  row["step_s"] = step_s
  row["step_s_min"] = min(timed)
  row["timed_steps"] = len(timed)
  row["tokens_per_s"] = _BATCH.value * seqlen / step_s
  stats = common.device_memory_stats()
  if base is not None and "peak_bytes_in_use" in stats:
    row["activation_GB"] = (stats["peak_bytes_in_use"] - base - param_bytes) / 1e9
  row["param_GB"] = param_bytes / 1e9
  return row


def run_child(spec: str, n_layers: int | None = None, compile_only: bool = False) -> dict:
  policy, seqlen = spec.split(":")
  cmd = [sys.executable, "-m", "ma2mba_jax.bench.remat", f"--child={spec}",
         f"--model={_MODEL.value}", f"--batch={_BATCH.value}", f"--l={_L.value}",
         f"--s={_S.value}", f"--cell_saves={_CELL_SAVES.value}", f"--offload={_OFFLOAD.value}",
         f"--ssd_impl={_SSD_IMPL.value}", f"--planner={_PLANNER.value}",
         f"--max_candidates={_MAX_CANDIDATES.value}",
         f"--compute_dtype={_DTYPE.value}", f"--repeats={_REPEATS.value}"]
  if _BLOCK_IMPL.value:
    cmd.append(f"--block_impl={_BLOCK_IMPL.value}")
  if _BUDGET_GB.value is not None:
    cmd.append(f"--budget_gb={_BUDGET_GB.value}")
  n_layers = n_layers or _N_LAYERS.value
  if n_layers:
    cmd.append(f"--n_layers={n_layers}")
  if compile_only or _COMPILE_ONLY.value:
    cmd.append("--compile_only")
  from ma2mba_jax.bench import common
  return common.run_child(cmd, timeout=_TIMEOUT.value,
                          identity={"policy": policy, "T": int(seqlen),
                                    "block_impl": _BLOCK_IMPL.value, "n_layers": n_layers})


def add_marginal(row: dict) -> None:
  """Adds the bytes per token of one more layer, from a half-depth compile of the same row."""
  n_layers = row.get("n_layers")
  if row["policy"] != "none" or "compiled_temp_GB" not in row or not n_layers or n_layers < 4:
    return  # only for the plain layer stack, deep enough that a layer's cost is linear
  half = run_child(f"{row['policy']}:{row['T']}", n_layers=n_layers // 2, compile_only=True)
  if "compiled_temp_GB" not in half:
    row["marginal_error"] = half.get("error")
    return
  extra_layers = n_layers - n_layers // 2
  row["per_token_layer_KB"] = ((row["compiled_temp_GB"] - half["compiled_temp_GB"]) * 1e6
                               / (extra_layers * row["batch"] * row["T"]))


def _series(row: dict) -> str:
  offload = row.get("offload", "none")
  return row["policy"] if offload == "none" else f"{row['policy']}, offload={offload}"


def plot(rows: list[dict], path: str) -> None:
  """Activation memory against length: one line per policy (and offload), paper dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  policies = sorted({r["policy"] for r in rows})
  all_series = sorted({_series(r) for r in rows})
  for i, series in enumerate(all_series):
    pts = sorted((r["T"], r.get("activation_GB", r.get("compiled_temp_GB")))
                 for r in rows if _series(r) == series and "error" not in r)
    if pts:
      ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"{series} (this run)")
  for i, policy in enumerate(policies):
    paper = sorted(PAPER_GB.get(policy, {}).items())
    if paper:
      ax.plot(*zip(*paper), "x--", color=f"C{len(all_series) + i}", alpha=0.6,
              label=f"{policy} (paper, A100)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length (tokens)")
  ax.set_ylabel("activation memory (GB)")
  ax.set_title(f"Mamba-2 {_MODEL.value}: activation memory, forward+backward")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv):
  del argv
  if _CHILD.value:
    policy, seqlen = _CHILD.value.split(":")
    print("RESULT " + json.dumps(run_one(policy, int(seqlen))), flush=True)
    return
  from ma2mba_jax.bench import common
  rows = []
  for seqlen in map(int, _LENGTHS.value):
    for policy in _POLICIES.value:
      row = run_child(f"{policy}:{seqlen}")
      if _MARGINAL.value:
        add_marginal(row)
      paper = PAPER_GB.get(policy, {}).get(seqlen)
      if paper is not None:
        row["paper_GB"] = paper
      print(row, flush=True)
      rows.append(row)
  columns = ["policy", "block_impl", "T", "offload", "l", "s", "activation_GB",
             "compiled_temp_GB", "host_temp_GB", "temp_per_token_layer_KB",
             "per_token_layer_KB", "predicted_GB", "paper_GB", "tokens_per_s", "step_s",
             "error"]
  print()
  common.print_table(rows, [c for c in columns if any(c in r for r in rows)])
  print("paper tokens/s (A100): " + ", ".join(f"{p} {v:,} @ {t}" for p, (t, v) in
                                               PAPER_TOK_S.items()))
  common.write_json(_JSON.value, {"env": common.environment(), "model": _MODEL.value,
                                  "rows": rows, "paper_GB": PAPER_GB})
  if _PNG.value:
    plot(rows, _PNG.value)


if __name__ == "__main__":
  app.run(main)
