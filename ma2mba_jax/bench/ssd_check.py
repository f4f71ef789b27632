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
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle

_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas", "triton"], "Backends to check.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (default: from the clock).")
_POISON_GIB = flags.DEFINE_float("poison_gib", 24.0, "Device memory to poison before each run.")
_SHAPES = flags.DEFINE_list("shapes", None, "Names of the shapes to check (default: all).")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")

TOL = {"float32": 1e-3, "bfloat16": 1e-2}
GRAD_TOL = {"float32": 3e-3, "bfloat16": 2e-2}
# Reads as NaN in f32 (0x7FC07FC0) and in each bf16 half (0x7FC0).
_POISON_BITS = 0x7FC07FC0


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  batch: int
  seqlen: int
  n_heads: int
  head_dim: int
  n_groups: int
  d_state: int
  chunk_len: int
  dtype: str
  initial_state: bool = False
  D_per_channel: bool = False


SHAPES = (
    Shape("odd_T_bf16", 2, 1000, 8, 64, 1, 128, 256, "bfloat16"),
    Shape("groups2_init_bf16", 1, 777, 8, 32, 2, 64, 64, "bfloat16", initial_state=True),
    Shape("groups4_f32", 2, 333, 8, 16, 4, 32, 32, "float32", D_per_channel=True),
    Shape("init_f32", 1, 1024, 4, 64, 1, 128, 256, "float32", initial_state=True),
    Shape("short_T_bf16", 1, 45, 4, 32, 1, 16, 64, "bfloat16", initial_state=True),
    Shape("2.7B_heads_bf16", 1, 1280, 80, 64, 1, 128, 256, "bfloat16", initial_state=True),
)


def make_inputs(shape: Shape, seed: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(seed), 9)
  b, t, h, p, g, n = (shape.batch, shape.seqlen, shape.n_heads, shape.head_dim,
                      shape.n_groups, shape.d_state)
  dtype = jnp.dtype(shape.dtype)
  inputs = dict(
      x=jax.random.normal(keys[0], (b, t, h, p)).astype(dtype),
      dt=jax.random.normal(keys[1], (b, t, h)) - 1.0,
      A=-jnp.exp(jax.random.uniform(keys[2], (h,), minval=-1.0, maxval=1.0)),
      B=jax.random.normal(keys[3], (b, t, g, n)).astype(dtype),
      C=jax.random.normal(keys[4], (b, t, g, n)).astype(dtype),
      D=jax.random.normal(keys[5], (h, p) if shape.D_per_channel else (h,)),
      dt_bias=jax.random.uniform(keys[6], (h,), minval=-2.0, maxval=0.5),
  )
  if shape.initial_state:
    inputs["initial_state"] = jax.random.normal(keys[7], (b, h, p, n))
  return inputs


def cotangents(shape: Shape, seed: int):
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  return (jax.random.normal(k1, (shape.batch, shape.seqlen, shape.n_heads, shape.head_dim)),
          jax.random.normal(k2, (shape.batch, shape.n_heads, shape.head_dim, shape.d_state)))


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


def rel_err(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_shape(shape: Shape, seed: int, impls) -> list[dict]:
  inputs = make_inputs(shape, seed)
  cot = cotangents(shape, seed)
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
    oracle = {k: np.asarray(v) for k, v in outputs_and_grads(ssd_oracle, inputs64, cot64).items()}
  results = {}
  rows = []
  for impl in impls:
    fn = functools.partial(ssd, chunk_len=shape.chunk_len, impl=impl)
    poison_device_memory(_POISON_GIB.value)
    row = {"shape": shape.name, "impl": impl}
    try:
      out = outputs_and_grads(fn, inputs, cot)
    except Exception as err:  # noqa: BLE001 - a backend that fails is a result
      row.update(status="ERROR", error=f"{type(err).__name__}: {str(err)[:400]}")
      rows.append(row)
      print(row, flush=True)
      continue
    results[impl] = out
    errs = {k: rel_err(v, oracle[k]) for k, v in out.items()}
    row["y"] = errs["y"]
    row["final_state"] = errs["final_state"]
    grad_errs = {k: v for k, v in errs.items() if k.startswith("d")}
    worst = max(grad_errs, key=lambda k: -1.0 if np.isnan(grad_errs[k]) else grad_errs[k])
    worst = next((k for k, v in grad_errs.items() if np.isnan(v)), worst)
    row["worst_grad"] = f"{worst}={grad_errs[worst]:.1e}"
    row["all_errs"] = errs
    if "xla" in results and impl != "xla":
      row["y_vs_xla"] = rel_err(out["y"], np.asarray(results["xla"]["y"], np.float32))
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
  shapes = [s for s in SHAPES if _SHAPES.value is None or s.name in _SHAPES.value]
  rows = []
  for shape in shapes:
    rows += check_shape(shape, seed, _IMPLS.value)
  common.write_json(_JSON.value, {"env": common.environment(), "seed": seed, "rows": rows,
                                  "shapes": [dataclasses.asdict(s) for s in shapes]})
  print()
  sci = lambda v: f"{v:.1e}" if isinstance(v, float) else v
  common.print_table([{k: sci(v) for k, v in r.items()} for r in rows],
                     ["shape", "impl", "y", "final_state", "worst_grad", "y_vs_xla", "status",
                      "error"])
  failed = [r for r in rows if r["status"] != "ok"]
  print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")


if __name__ == "__main__":
  app.run(main)
