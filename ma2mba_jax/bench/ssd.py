"""SSD benchmark: median ms forward and forward+backward, peak memory, TFLOP/s, GB/s.

  python -m ma2mba_jax.bench.ssd --impl=xla --lengths=8192,32768 --heads=80,32 --json=out.json

Shapes follow the Mamba-2 models (P=64, N=128, G=1, batch 1, chunk 256, bf16 x/B/C, f32 dt).
The floor columns count the minimum work: FLOPs of the chunked algorithm
T * (2*Q*N*G + H*(2*Q*P + 4*N*P)) and bytes of reading x, dt, B, C once and writing y.
"""

from __future__ import annotations

import functools

from absl import app, flags
import jax
import jax.numpy as jnp

from ma2mba_jax.bench import common
from ma2mba_jax.kernels.ssd import ssd, resolve_impl

_IMPL = flags.DEFINE_list("impl", ["xla"], "Backends to time (auto, xla, pallas, triton).")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "32768", "131072"], "Sequence lengths T.")
_HEADS = flags.DEFINE_list("heads", ["80", "32"], "Head counts (80: 2.7B, 32: 370M).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "P.")
_D_STATE = flags.DEFINE_integer("d_state", 128, "N.")
_CHUNK = flags.DEFINE_integer("chunk_len", 256, "Q.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")
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


def bench_one(impl: str, t: int, h: int) -> dict:
  p, n, q = _HEAD_DIM.value, _D_STATE.value, _CHUNK.value
  row = {"impl": impl, "resolved": resolve_impl(impl), "T": t, "H": h}
  inputs = make_inputs(t, h, p, n)
  fn = functools.partial(ssd, chunk_len=q, impl=impl)
  fwd = jax.jit(lambda inp: fn(**inp))
  differentiable = ("x", "dt", "A", "B", "C", "D", "dt_bias")

  def loss(diff, rest):
    y, state = fn(**diff, **rest)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)
  fwd_bwd = jax.jit(jax.grad(loss))
  diff = {k: inputs[k] for k in differentiable}
  rest = {k: v for k, v in inputs.items() if k not in differentiable}
  base = common.device_memory_stats().get("bytes_in_use")
  try:
    row["fwd_ms"] = common.median_ms(lambda: fwd(inputs), repeats=_REPEATS.value)
    row["fwd_bwd_ms"] = common.median_ms(lambda: fwd_bwd(diff, rest), repeats=_REPEATS.value)
  except Exception as err:  # noqa: BLE001 - report OOM as a result, re-raise the rest
    if not common.is_oom(err):
      raise
    row["error"] = "OOM"
    return row
  stats = common.device_memory_stats()
  if base is not None and "peak_bytes_in_use" in stats:
    row["peak_extra_GiB"] = (stats["peak_bytes_in_use"] - base) / 2**30
  else:
    temp = common.compiled_temp_bytes(fwd_bwd, diff, rest)
    row["temp_GiB(compiled)"] = None if temp is None else temp / 2**30
  flops, nbytes = ssd_flops(t, h, p, n, q), ssd_bytes(t, h, p, n)
  row["fwd_TFLOPs"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
  row["fwd_GBs"] = nbytes / (row["fwd_ms"] * 1e-3) / 1e9
  row["fwd_floor_ms"] = max(flops / (_PEAK_TFLOPS.value * 1e12),
                            nbytes / (_PEAK_GBPS.value * 1e9)) * 1e3
  # Backward: about twice the forward FLOPs and reads of inputs + cotangent, writes of grads.
  row["fwd_bwd_floor_ms"] = max(3 * flops / (_PEAK_TFLOPS.value * 1e12),
                                3 * nbytes / (_PEAK_GBPS.value * 1e9)) * 1e3
  return row


def main(argv):
  del argv
  rows = []
  for h in map(int, _HEADS.value):
    for t in map(int, _LENGTHS.value):
      for impl in _IMPL.value:
        row = bench_one(impl, t, h)
        print(row, flush=True)
        rows.append(row)
  columns = ["impl", "resolved", "H", "T", "fwd_ms", "fwd_bwd_ms", "peak_extra_GiB",
             "temp_GiB(compiled)", "fwd_TFLOPs", "fwd_GBs", "fwd_floor_ms", "fwd_bwd_floor_ms",
             "error"]
  columns = [c for c in columns if any(c in r for r in rows)]
  print()
  common.print_table(rows, columns)
  common.write_json(_JSON.value, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
  app.run(main)
