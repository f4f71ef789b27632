"""GPU check of every SSD backend against the float64 oracle and the plain-XLA reference.

  python -m ma2mba_jax.bench.ssd_check --impls=xla,pallas,triton --json=bench_out/check.json

For each shape (odd T, several groups, initial state, f32 and bf16, the 2.7B head shapes)
draws fresh random inputs (seed printed; `--seed` repeats a run), computes the outputs and
the gradients of every input (x, dt, A, B, C, D, dt_bias, initial_state) with one random
cotangent per output, and reports ‖out − ref‖/‖ref‖ against the oracle (f64 sequential
recurrence, run on the same rounded inputs) and against `impl="xla"`.

Unwritten output elements: before each backend runs, most of the free device memory is
filled with a bit pattern that reads as NaN in both f32 and bf16, then released; XLA's
allocator hands those blocks out again, so an element a kernel forgot to write shows up as
NaN, which fails the check. Pass: outputs within 1e-2 (bf16) / 1e-3 (f32, tf32 matmuls
allowed) of the oracle, gradients within 2e-2 / 3e-3, everything finite.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from ma2mba_jax.bench import common
from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.cases import Case, make_inputs, random_cotangents
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from ma2mba_jax.testing import rel_err

_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas", "triton"], "Backends to check.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (default: from the clock).")
_POISON_GIB = flags.DEFINE_float("poison_gib", 24.0, "Device memory to poison before each run.")
_SHAPES = flags.DEFINE_list("shapes", None, "Names of the shapes to check (default: all).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")

TOL = {"float32": 1e-3, "bfloat16": 1e-2}
GRAD_TOL = {"float32": 3e-3, "bfloat16": 2e-2}
# Reads as NaN in f32 (0x7FC07FC0) and in each bf16 half (0x7FC0).
_POISON_BITS = 0x7FC07FC0


# name -> sizes (odd T, several groups, initial state, f32 and bf16, the 2.7B head shapes).
SHAPES = {
    "odd_T_bf16": Case(2, 1000, 8, 64, 1, 128, 256, "bfloat16"),
    "groups2_init_bf16": Case(1, 777, 8, 32, 2, 64, 64, "bfloat16", with_initial_state=True),
    "groups4_f32": Case(2, 333, 8, 16, 4, 32, 32, "float32", D_per_channel=True),
    "init_f32": Case(1, 1024, 4, 64, 1, 128, 256, "float32", with_initial_state=True),
    "short_T_bf16": Case(1, 45, 4, 32, 1, 16, 64, "bfloat16", with_initial_state=True),
    "2.7B_heads_bf16": Case(1, 1280, 80, 64, 1, 128, 256, "bfloat16",
                            with_initial_state=True),
}


def outputs_and_grads(fn, inputs, cot):
  def run(inp):
    (y, state), vjp = jax.vjp(lambda i: fn(**i), inp)
    (grads,) = vjp((cot[0].astype(y.dtype), cot[1].astype(state.dtype)))
    return y, state, grads
  y, state, grads = jax.jit(run)(inputs)
  return {"y": y, "final_state": state, **{f"d{k}": v for k, v in grads.items()}}


def poison_device_memory(gib: float) -> None:
  """Fill up to `gib` of free device memory with NaN bits, then free it for reuse."""
  blocks = []
  per_block = 1 << 28                                         # 1 GiB of uint32
  try:
    for _ in range(int(gib)):
      blocks.append(jnp.full((per_block,), _POISON_BITS, jnp.uint32))
    jax.block_until_ready(blocks)
  except Exception as err:  # noqa: BLE001 - stop when the device is full
    if not common.is_oom(err):
      raise
  del blocks


def check_shape(name: str, shape: Case, seed: int, impls) -> list[dict]:
  inputs = make_inputs(shape, seed)
  cot = random_cotangents(shape, seed)
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
    oracle = {k: np.asarray(v) for k, v in outputs_and_grads(ssd_oracle, inputs64, cot64).items()}
  results = {}
  rows = []
  for impl in impls:
    fn = functools.partial(ssd, chunk_len=shape.chunk_len, impl=impl)
    poison_device_memory(_POISON_GIB.value)
    row = {"shape": name, "impl": impl}
    try:
      out = outputs_and_grads(fn, inputs, cot)
    except Exception as err:  # noqa: BLE001 - a backend that fails is a result
      row.update(status="ERROR", error=f"{type(err).__name__}: {str(err)[:400]}")
      rows.append(row)
      print(row, flush=True)
      continue
    results[impl] = out
    errs = {k: rel_err(v, oracle[k], nan_if_not_finite=True) for k, v in out.items()}
    row["y"] = errs["y"]
    row["final_state"] = errs["final_state"]
    grad_errs = {k: v for k, v in errs.items() if k.startswith("d")}
    worst = max(grad_errs, key=lambda k: -1.0 if np.isnan(grad_errs[k]) else grad_errs[k])
    worst = next((k for k, v in grad_errs.items() if np.isnan(v)), worst)
    row["worst_grad"] = f"{worst}={grad_errs[worst]:.1e}"
    row["all_errs"] = errs
    if "xla" in results and impl != "xla":
      row["y_vs_xla"] = rel_err(out["y"], np.asarray(results["xla"]["y"], np.float32),
                                nan_if_not_finite=True)
    ok = (errs["y"] < TOL[shape.dtype] and errs["final_state"] < TOL[shape.dtype]
          and all(v < GRAD_TOL[shape.dtype] for v in grad_errs.values()))
    row["status"] = "ok" if ok else "FAIL"
    rows.append(row)
    print({k: v for k, v in row.items() if k != "all_errs"}, flush=True)
  return rows


def main(argv):
  del argv
  seed = _SEED.value if _SEED.value is not None else int(time.time()) % 100_000
  print(f"ssd_check seed={seed} device={jax.devices()[0].device_kind}", flush=True)
  shapes = {n: s for n, s in SHAPES.items() if _SHAPES.value is None or n in _SHAPES.value}
  rows = []
  for name, shape in shapes.items():
    rows += check_shape(name, shape, seed, _IMPLS.value)
  common.write_json(_JSON.value, {
      "env": common.environment(), "seed": seed, "rows": rows,
      "shapes": [{"name": n, **dataclasses.asdict(s)} for n, s in shapes.items()]})
  print()
  sci = lambda v: f"{v:.1e}" if isinstance(v, float) else v
  common.print_table([{k: sci(v) for k, v in r.items()} for r in rows],
                     ["shape", "impl", "y", "final_state", "worst_grad", "y_vs_xla", "status",
                      "error"])
  failed = [r for r in rows if r["status"] != "ok"]
  print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")


if __name__ == "__main__":
  app.run(main)
