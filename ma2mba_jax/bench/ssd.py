"""SSD benchmark: median ms forward and forward+backward, peak memory, TFLOP/s, GB/s, floor.

  python -m ma2mba_jax.bench.ssd --impl=xla,pallas,triton --lengths=8192,32768,131072 \
      --heads=80,32 --json=bench_out/ssd.json
  python -m ma2mba_jax.bench.ssd --impl=pallas:block_l=128:warps_chunk=8 --lengths=32768 --heads=80
  python -m ma2mba_jax.bench.ssd --breakdown --impl=pallas,triton --lengths=32768 --heads=80

Shapes follow the Mamba-2 models (P=64, N=128, G=1, batch 1, chunk 256, bf16 x/B/C, f32 dt,
with D and dt_bias as in the model). An impl may carry backend options after colons
(`name:key=value:...`; ints or strings), e.g. block sizes, to compare variants in one run;
they apply over the backend's own tuned settings (pallas: `TUNED_OPTIONS`).

Timing: each measurement runs the jitted function `--inner` times back to back (JAX
dispatches asynchronously, so the launch overhead hides behind the device work), waits
once, and divides; the median over `--repeats` such batches is reported. Two input sets
alternate so the 50 MB L2 cache cannot hold one run's inputs for the next.

Memory: XLA's compiled plan of each jitted function, temporaries plus outputs (what the
call needs beyond its inputs; includes the gradients for forward+backward).

The floor counts the minimum work: forward FLOPs of the chunked algorithm
T * (2*Q*N*G + H*(2*Q*P + 4*N*P)) over the matmul ceiling, and bytes of reading x, dt, B, C
once and writing y over the copy ceiling; forward+backward is taken as 3x both.
`--breakdown` times each kernel of a kernel backend alone on the same inputs.
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from ma2mba_jax.bench import common
from ma2mba_jax.kernels.ssd import ssd, resolve_impl

_IMPL = flags.DEFINE_list("impl", ["xla", "pallas", "triton"],
                          "Backends to time (auto, xla, pallas, triton[:key=value...]).")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "32768", "131072"], "Sequence lengths T.")
_HEADS = flags.DEFINE_list("heads", ["80", "32"], "Head counts (80: 2.7B, 32: 370M).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "P.")
_D_STATE = flags.DEFINE_integer("d_state", 128, "N.")
_CHUNK = flags.DEFINE_integer("chunk_len", 256, "Q.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed batches (median reported).")
_INNER = flags.DEFINE_integer("inner", 5, "Calls per timed batch.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Time each kernel of the backends alone.")
_KERNELS = flags.DEFINE_list("kernels", None, "With --breakdown: only kernels named so.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 750.0, "Matmul ceiling for the floor (bf16).")
_PEAK_GBPS = flags.DEFINE_float("peak_gbps", 3000.0, "Memory ceiling for the floor.")


def ssd_flops(t: int, h: int, p: int, n: int, q: int, g: int = 1) -> float:
  """Forward FLOPs of the chunked SSD (C.B^T per group, scores@x, state in and out per head)."""
  return float(t) * (2 * q * n * g + h * (2 * q * p + 4 * n * p))


def ssd_bytes(t: int, h: int, p: int, n: int, g: int = 1, itemsize: int = 2) -> float:
  """Bytes that must move in the forward: x, dt (f32), B, C read once and y written once."""
  return float(t) * (2 * h * p * itemsize + 4 * h + 2 * g * n * itemsize)


def make_inputs(t: int, h: int, p: int, n: int, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 6)
  return dict(
      x=jax.random.normal(k[0], (1, t, h, p), jnp.bfloat16),
      dt=jax.random.normal(k[1], (1, t, h), jnp.float32) - 1.0,
      A=-jnp.exp(jax.random.uniform(k[2], (h,), minval=-1.0, maxval=1.0)),
      B=jax.random.normal(k[3], (1, t, 1, n), jnp.bfloat16),
      C=jax.random.normal(k[4], (1, t, 1, n), jnp.bfloat16),
      D=jax.random.normal(k[5], (h,), jnp.float32),
      dt_bias=jnp.full((h,), -1.0, jnp.float32),
  )


def parse_impl(spec: str) -> tuple[str, dict[str, int]]:
  """'pallas:block_l=128:state_impl=fused' -> ('pallas', {'block_l': 128, 'state_impl': 'fused'})."""
  name, *opts = spec.split(":")
  options = {}
  for opt in opts:
    key, _, value = opt.partition("=")
    options[key] = int(value) if value.lstrip("-").isdigit() else value
  return name, options


def time_ms(fn, arg_sets) -> float:
  """Median ms per call: batches of `--inner` back-to-back calls, one wait per batch."""
  for args in arg_sets:
    common.block(fn(*args))
  samples = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    out = None
    for k in range(_INNER.value):
      out = fn(*arg_sets[k % len(arg_sets)])
    common.block(out)
    samples.append((time.perf_counter() - start) * 1e3 / _INNER.value)
  return statistics.median(samples)


def _plan_gib(compiled) -> float | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**30


def bench_one(spec: str, t: int, h: int, input_sets) -> dict:
  p, n, q = _HEAD_DIM.value, _D_STATE.value, _CHUNK.value
  impl, options = parse_impl(spec)
  row = {"impl": spec, "resolved": resolve_impl(impl), "H": h, "T": t}
  fn = functools.partial(ssd, chunk_len=q, impl=impl, **options)
  differentiable = ("x", "dt", "A", "B", "C", "D", "dt_bias")

  def loss(diff):
    y, state = fn(**diff)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)
  args = [({k: s[k] for k in differentiable},) for s in input_sets]
  try:
    for name, f in (("fwd", lambda inp: fn(**inp)), ("fwd_bwd", jax.grad(loss))):
      compiled = jax.jit(f).lower(*args[0]).compile()
      row[f"{name}_ms"] = time_ms(compiled, args)
      row[f"{name}_mem_GiB"] = _plan_gib(compiled)
  except Exception as err:  # noqa: BLE001 - report OOM and kernel failures as results
    row["error"] = "OOM" if common.is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    return row
  flops, nbytes = ssd_flops(t, h, p, n, q), ssd_bytes(t, h, p, n)
  row["fwd_TFLOPs"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
  row["fwd_GBs"] = nbytes / (row["fwd_ms"] * 1e-3) / 1e9
  row["fwd_floor_ms"] = max(flops / (_PEAK_TFLOPS.value * 1e12),
                            nbytes / (_PEAK_GBPS.value * 1e9)) * 1e3
  row["fwd_bwd_TFLOPs"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
  row["fwd_bwd_floor_ms"] = 3 * row["fwd_floor_ms"]
  return row


def breakdown(spec: str, t: int, h: int, inputs) -> list[dict]:
  """Times each kernel of a kernel backend alone, on the inputs the backend would give it."""
  import importlib
  from ma2mba_jax.kernels.ssd import api
  from ma2mba_jax.kernels.ssd import chunked
  impl, options = parse_impl(spec)
  backend = importlib.import_module(f"ma2mba_jax.kernels.ssd.{impl}")
  kernels = backend.kernels
  # The backend's own tuned settings (as its registry core applies them), then the spec's.
  opts = chunked.Options(chunk_len=_CHUNK.value,
                         **{**getattr(backend, "TUNED_OPTIONS", {}), **options})
  q, p, n = opts.chunk_len, _HEAD_DIM.value, _D_STATE.value
  x, B, C = inputs["x"], inputs["B"], inputs["C"]
  dt = api.process_dt(inputs["dt"], inputs["dt_bias"], True, (0.0, float("inf")))
  A = inputs["A"]
  D = jnp.broadcast_to(inputs["D"][:, None], (h, p)).astype(jnp.float32)
  state_dtype, cb_dtype = chunked.storage_dtypes(x, opts)
  dt_t, cs, cs_last = chunked.decays(dt, A, q)
  cb = chunked.chunk_cb(C, B, q, cb_dtype)
  w_state = chunked.state_weights(dt_t, cs, cs_last, q)
  decay = jnp.exp(cs_last)
  init = jnp.zeros((1, h, p, n), jnp.float32)
  inc = kernels.chunk_state(x, B, w_state, **opts.kernel_args("state"))
  states, _, _ = kernels.state_pass(inc, decay, init, reverse=False, out_dtype=state_dtype,
                                    **opts.kernel_args("pass"))
  dy = x
  stages = {
      "glue: cs, CB, weights": (
          lambda dt, A, B, C: (chunked.decays(dt, A, q), chunked.chunk_cb(C, B, q, cb_dtype)),
          (dt, A, B, C)),
      "chunk_state": (functools.partial(kernels.chunk_state, **opts.kernel_args("state")),
                      (x, B, w_state)),
      "state_pass": (lambda *a: kernels.state_pass(*a, reverse=False, out_dtype=state_dtype,
                                                   **opts.kernel_args("pass")),
                     (inc, decay, init)),
      "chunk_scan_fwd": (functools.partial(kernels.chunk_scan_fwd,
                                           **opts.kernel_args("chunk_fwd")),
                         (x, dt_t, cs, cb, C, states, D)),
      "state_pass (reverse)": (
          lambda *a: kernels.state_pass(*a, reverse=True, out_dtype=state_dtype,
                                        **opts.kernel_args("pass")),
          (inc, decay, init, states)),
      "chunk_scan_bwd_dx": (functools.partial(kernels.chunk_scan_bwd_dx,
                                              **opts.kernel_args("chunk")),
                            (dy, x, dt_t, cs, cb, B, states, D)),
      "chunk_dcb": (functools.partial(kernels.chunk_dcb, n_groups=1, **opts.kernel_args("dcb")),
                    (dy, x, dt_t, cs, cb)),
      "head_contract": (functools.partial(kernels.head_contract, **opts.kernel_args("contract")),
                        (dy, jnp.exp(cs), states, C)),
  }
  rows = []
  for name, (fn, args) in stages.items():
    if _KERNELS.value and not any(name.startswith(k) for k in _KERNELS.value):
      continue
    row = {"impl": spec, "H": h, "T": t, "kernel": name}
    try:
      row["ms"] = time_ms(jax.jit(fn), [args])
    except Exception as err:  # noqa: BLE001
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    print(row, flush=True)
    rows.append(row)
  return rows


def main(argv):
  del argv
  rows = []
  for h in map(int, _HEADS.value):
    for t in map(int, _LENGTHS.value):
      input_sets = [make_inputs(t, h, _HEAD_DIM.value, _D_STATE.value, seed=s) for s in (0, 1)]
      for spec in _IMPL.value:
        if _BREAKDOWN.value:
          rows += breakdown(spec, t, h, input_sets[0])
          continue
        row = bench_one(spec, t, h, input_sets)
        print(row, flush=True)
        rows.append(row)
      del input_sets
  if _BREAKDOWN.value:
    columns = ["impl", "H", "T", "kernel", "ms", "error"]
  else:
    columns = ["impl", "resolved", "H", "T", "fwd_ms", "fwd_bwd_ms", "fwd_mem_GiB",
               "fwd_bwd_mem_GiB", "fwd_TFLOPs", "fwd_GBs", "fwd_bwd_TFLOPs", "fwd_floor_ms",
               "fwd_bwd_floor_ms", "error"]
  columns = [c for c in columns if any(c in r for r in rows)]
  common.write_json(_JSON.value, {"env": common.environment(), "rows": rows})
  print()
  common.print_table(rows, columns)


if __name__ == "__main__":
  app.run(main)
