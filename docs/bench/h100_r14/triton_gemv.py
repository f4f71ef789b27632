"""Session 14 exploration (not a library entry point): can a raw Triton GEMV (jax-triton)
stream the 3.1B model's in_proj faster than XLA's reduction (gemv.in_proj_reduce, 21.1 us a
layer in the decode step, 2.6 TB/s)?

Times, at the fused_reduce step's shapes (Wt [Np = 10584, D = 2560] bf16, u [1, D] bf16,
h [1, D] f32 -> [1, Np] f32 with column N = sum(h^2)), 16 different matrices a jitted call:
  xla_read     jnp.sum(Wt, axis=1) in f32 (no input vector): XLA's streaming ceiling
  xla_reduce   gemv.in_proj_reduce (what the decode step runs now)
  grid ...     one program per BN rows, the whole row in K/BK static steps
  pers ...     P programs, each looping over row blocks (tl.range, num_stages)
GPU us a call from a jax.profiler trace (kernels alone) and wall us a call (16 x 4 calls
dispatched, launch gaps included). err: max |out - xla_reduce| / max |xla_reduce|.

  python docs/bench/h100_r14/triton_gemv.py [--quick]
"""
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

from ma2mba_jax.bench import common, kernel_profile
from ma2mba_jax.kernels.decode.gemv import in_proj_reduce

N, D = 10576, 2560
NP = N + 8                 # REDUCE_PAD rows: the fused_reduce step's padded in_proj
MATRICES, DISPATCHES = 16, 4
F32 = jnp.float32


@triton.jit
def _grid_kernel(w_ptr, u_ptr, h_ptr, out_ptr, NP: tl.constexpr, K: tl.constexpr,
                 SS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVICT: tl.constexpr):
  pid = tl.program_id(0)
  rows = pid * BN + tl.arange(0, BN)
  ok = rows < NP
  acc = tl.zeros((BN, BK), tl.float32)
  for k0 in tl.static_range(0, K, BK):
    cols = k0 + tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok[:, None],
                eviction_policy=EVICT)
    u = tl.load(u_ptr + cols)
    acc += w.to(tl.float32) * u.to(tl.float32)[None, :]
  out = tl.sum(acc, axis=1)
  if pid == SS // BN:
    sq = tl.zeros((BK,), tl.float32)
    for k0 in tl.static_range(0, K, BK):
      hv = tl.load(h_ptr + k0 + tl.arange(0, BK))
      sq += hv * hv
    out = tl.where(rows == SS, tl.sum(sq, axis=0), out)
  tl.store(out_ptr + rows, out, mask=ok)


@triton.jit
def _persistent_kernel(w_ptr, u_ptr, h_ptr, out_ptr, NP: tl.constexpr, K: tl.constexpr,
                       SS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       EVICT: tl.constexpr, P: tl.constexpr, STAGES: tl.constexpr):
  pid = tl.program_id(0)
  blocks: tl.constexpr = (NP + BN - 1) // BN
  ss = 0.0
  if pid == (SS // BN) % P:          # the program that writes row SS
    sq = tl.zeros((BK,), tl.float32)
    for k0 in tl.static_range(0, K, BK):
      hv = tl.load(h_ptr + k0 + tl.arange(0, BK))
      sq += hv * hv
    ss = tl.sum(sq, axis=0)
  for b in tl.range(pid, blocks, P, num_stages=STAGES):
    rows = b * BN + tl.arange(0, BN)
    ok = rows < NP
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in tl.static_range(0, K, BK):
      cols = k0 + tl.arange(0, BK)
      w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok[:, None],
                  eviction_policy=EVICT)
      u = tl.load(u_ptr + cols)
      acc += w.to(tl.float32) * u.to(tl.float32)[None, :]
    out = tl.where(rows == SS, ss, tl.sum(acc, axis=1))
    tl.store(out_ptr + rows, out, mask=ok)


def grid_gemv(u, h, wt, *, bn, bk, warps, evict):
  return jt.triton_call(
      wt, u, h.astype(F32), kernel=_grid_kernel,
      out_shape=jax.ShapeDtypeStruct((1, NP), F32), grid=(triton.cdiv(NP, bn),),
      num_warps=warps, num_stages=1, name="gemv_grid",
      NP=NP, K=D, SS=N, BN=bn, BK=bk, EVICT=evict)


def main():
  quick = "--quick" in sys.argv
  keys = iter(jax.random.split(jax.random.key(0), 2 * MATRICES + 4))
  mats = [jnp.pad((jax.random.normal(next(keys), (N, D)) * D ** -0.5).astype(jnp.bfloat16),
                  ((0, NP - N), (0, 0))) for _ in range(MATRICES)]
  hs = [jax.random.normal(next(keys), (1, D)) for _ in range(MATRICES)]
  us_ = [h.astype(jnp.bfloat16) for h in hs]
  jax.block_until_ready((mats, hs, us_))
  nbytes = NP * D * 2
  results = []
  ref = None

  def measure(name, fn):
    nonlocal ref
    chain = jax.jit(lambda us, hs, ws: [fn(u, h, w) for u, h, w in zip(us, hs, ws)])
    try:
      outs = jax.block_until_ready(chain(us_, hs, mats))
    except Exception as e:  # noqa: BLE001 - a config Triton rejects is a result
      print(f"{name:44s} error {type(e).__name__}: {str(e)[:160]}", flush=True)
      return
    if ref is None and name == "xla_reduce":
      ref = outs
    err = (max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r))) for o, r in zip(outs, ref))
           if ref is not None and name != "xla_read" else float("nan"))

    def batch():
      for _ in range(DISPATCHES):
        out = chain(us_, hs, mats)
      return out
    wall = common.median_ms(batch, warmup=1, repeats=7) * 1e3 / (DISPATCHES * MATRICES)
    rows = kernel_profile.profile(lambda: chain(us_, hs, mats), f"/tmp/gemv_prof/{len(results)}",
                                  calls=2)
    gpu = sum(r["us/call"] for r in rows) / MATRICES
    results.append(dict(name=name, wall_us=wall, gpu_us=gpu, tbs=nbytes / gpu / 1e6, err=err))
    print(f"{name:44s} gpu {gpu:7.2f} us {nbytes / gpu / 1e6:5.2f} TB/s   wall {wall:7.2f} us"
          f"   err {err:.1e}", flush=True)

  measure("xla_reduce", lambda u, h, w: in_proj_reduce(u, h, w, N))
  measure("xla_read", lambda u, h, w: jnp.sum(w, axis=1, dtype=F32)[None])
  grid = [(bn, bk, warps, ev) for bn, bk, warps, ev in itertools.product(
      (2, 4, 8, 16), (256, 512), (2, 4, 8), ("evict_first",))]
  grid += [(4, 512, 4, ""), (8, 512, 4, ""), (8, 256, 4, ""), (16, 512, 8, "")]
  if quick:
    grid = [(4, 512, 4, "evict_first"), (8, 512, 4, "")]
  for bn, bk, warps, ev in grid:
    if bn * bk // (32 * warps) > 128 or bn * bk // (32 * warps) < 8:
      continue          # too many registers a thread, or too little to stream
    measure(f"grid bn={bn} bk={bk} warps={warps} {ev or 'normal'}",
            lambda u, h, w, a=(bn, bk, warps, ev): grid_gemv(u, h, w, bn=a[0], bk=a[1],
                                                             warps=a[2], evict=a[3]))
  pers = [] if quick else [(bn, bk, warps, p, st) for bn, bk, warps, p, st in itertools.product(
      (4, 8), (512,), (4,), (132, 264, 528), (1, 3))]
  for bn, bk, warps, p, st in pers:
    def fn(u, h, w, a=(bn, bk, warps, p, st)):
      return jt.triton_call(
          w, u, h.astype(F32), kernel=_persistent_kernel,
          out_shape=jax.ShapeDtypeStruct((1, NP), F32), grid=(a[3],), num_warps=a[2],
          num_stages=1, name="gemv_pers", NP=NP, K=D, SS=N, BN=a[0], BK=a[1],
          EVICT="evict_first", P=a[3], STAGES=a[4])
    measure(f"pers bn={bn} bk={bk} warps={warps} P={p} stages={st}", fn)
  best = sorted((r for r in results if r["name"].startswith(("grid", "pers"))
                 and r["err"] < 1e-4), key=lambda r: r["gpu_us"])[:5]
  print("\nbest (gpu us):")
  for r in best:
    print(f"  {r['gpu_us']:7.2f} us {r['tbs']:5.2f} TB/s  {r['name']}")
  out = os.environ.get("OUT")
  if out:
    with open(f"{out}/triton_gemv.json", "w") as f:
      json.dump(dict(env=common.environment(), np=NP, d=D, rows=results), f, indent=1)


if __name__ == "__main__":
  main()
