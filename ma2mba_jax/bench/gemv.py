"""The decode GEMVs at batch 1: XLA's einsum against kernels/decode/gemv over a config sweep.

  python -m ma2mba_jax.bench.gemv --preset=2.7b --json=bench_out/gemv.json
  python -m ma2mba_jax.bench.gemv --sweep=defaults          # the module's DEFAULTS only

For one layer's shapes of the preset (bf16 weights, f32 accumulation), times
  xla       jnp.einsum of the cd-rounded input with the kernel as fused_decode_step(matmul=
            "xla") calls it (kn: [D, N] / [E, D], the stored layout), and on the transposed
            layout (nk) that the gemv kernels read; the matmul alone, no norm;
  xla_mulsum  each kernel's whole job (norm, matmul, rounding, residual) written as XLA's
            multiply-and-reduce of the nk matrix (a reduction fusion, not a dot);
  xla_reduce  (in_proj) gemv.in_proj_reduce, as the fused_reduce decode step calls it;
  in_proj / out_proj  gemv.in_proj (RMS norm inside) and gemv.out_proj (gated norm and
            residual inside) on the transposed, padded matrices, one row per config of the
            sweep (split_k > 1 includes its XLA epilogue, the sum of the partials).
TB/s = bytes of the weight matrix read (in_proj's padded to Np for the kernels) / time.

Timing: one jitted function makes `--matrices` calls back to back, each on its own input
vector and its own weight matrix (16 x 54 MB, so the 50 MB L2 cannot hold the next call's
matrix; each matrix once: XLA merges einsums that share a weight into one dot (DotMerger),
which halved the XLA rows' time in docs/bench/h100_r9/gemv_sweep and gemv_confirm, where 16
calls cycled through 8 matrices); `--dispatches` such functions are dispatched
asynchronously and waited for once; the time per call is the median over `--repeats`
batches divided by calls x dispatches (kernel launch gaps included, as in decoding; and
host-bound below ~20 us a call on an H100 host). --profile_dir:
also gpu_us, the GPU kernels' busy time per call from a jax.profiler trace (the kernel
alone, plus split_k's epilogue), which ranks the configs (`best`) when present. Every
config's first output is checked against the f32-accumulated einsum on the same inputs
(column err: relative error, bf16 rounding ~1e-3).

Sweep (--sweep=full): stage A, the vector path (--rows, default 1) over block_n x block_k
(x split_k for out_proj) at 4 warps and 1 or 3 stages; stage B, the best --top of stage A
over num_warps x num_stages; stage C, the best config at 2 and 4 rows and the tl.dot path
(16 rows) over a few blocks. New configs stop after --budget_s seconds (what was measured
is printed and written). --sweep=confirm: the DEFAULTS at 1, 2, 4 and 16 rows, then a
small neighbourhood of the batch-1 defaults. --sweep=defaults: the DEFAULTS only.
--sweep=evict: the batch-1 DEFAULTS on the one-program-a-block grid (programs=0) and three
neighbours, with and without evict_first (Config.eviction) and loading tiles one step ahead
(Config.ahead). --sweep=persistent: the batch-1 DEFAULTS, then Config.programs (each
program normalises the input once and loops over column blocks) over a few blocks and
program counts, evict_first. Every sweep
also times xla_read, a row sum of the nk matrix (jnp.sum in f32, no input vector): what
XLA's reduction streams the same bytes at, a ceiling for a GEMV kernel of this size.
"""

from __future__ import annotations

import functools
import itertools
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "2.7b", "Mamba-2 preset (models/presets.py).")
_ROWS = flags.DEFINE_integer("rows", 1, "Rows (batch) of the main sweep.")
_MATRICES = flags.DEFINE_integer("matrices", 16, "Calls per jitted function, each on its "
                                 "own weight matrix.")
_DISPATCHES = flags.DEFINE_integer("dispatches", 4, "Functions dispatched per timed batch.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed batches (median reported).")
_SWEEP = flags.DEFINE_enum("sweep", "full", ["full", "confirm", "defaults", "evict",
                                             "persistent"],
                          "What to time.")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Also time each config's kernels on the "
                               "GPU (jax.profiler, bench/kernel_profile.py) under this folder: "
                               "column gpu_us, the kernels' busy time a call, no launch gaps.")
_TOP = flags.DEFINE_integer("top", 3, "Stage A configs refined in stage B, per kernel.")
_BUDGET = flags.DEFINE_float("budget_s", 150.0, "No new config after this many seconds.")
_RESERVE = flags.DEFINE_float("reserve_s", 30.0, "Of the budget, kept for stage C.")
_OUT = flags.DEFINE_string("partial_json", None, "Rewrite the results here after each stage.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")

EPS = 1e-5
COLUMNS = ["kernel", "impl", "rows", "block_n", "block_k", "split_k", "num_warps",
           "num_stages", "unroll", "eviction", "ahead", "programs", "us", "TB/s", "gpu_us",
           "gpu_TB/s", "err", "stage"]


class Bench:
  """Inputs and timing for one preset's shapes."""

  def __init__(self, preset: str):
    import jax
    import jax.numpy as jnp

    from ma2mba_jax.models.presets import mamba2_config

    c = mamba2_config(preset)
    self.c = c
    self.d, self.e, self.h, self.g = c.d_model, c.d_inner, c.n_heads, c.n_groups
    self.n = c.d_in_proj
    self.np_ = self.n + 256 - self.n % 256               # padded_decode_weights' Np
    bf = jnp.bfloat16
    keys = iter(jax.random.split(jax.random.key(0), 4 * _MATRICES.value + 8))

    def mat(shape, fan_in):
      return (jax.random.normal(next(keys), shape) * fan_in ** -0.5).astype(bf)

    # Both layouts of each matrix: kn as stored (XLA's einsum), nk as the kernels read.
    self.w_in_kn = [mat((self.d, self.n), self.d) for _ in range(_MATRICES.value)]
    self.w_in_nk = [jnp.pad(w, ((0, 0), (0, self.np_ - self.n))).T for w in self.w_in_kn]
    self.w_out_kn = [mat((self.e, self.d), self.e) for _ in range(_MATRICES.value)]
    self.w_out_nk = [w.T for w in self.w_out_kn]
    jax.block_until_ready((self.w_in_nk, self.w_out_nk))
    self.deadline = time.time() + _BUDGET.value
    self.interpret = jax.default_backend() != "gpu"   # CPU: the Pallas interpreter (smoke)
    self._inputs: dict[int, list] = {}
    self.profiled = 0

  def inputs(self, rows: int) -> list[dict]:
    """`--matrices` different input sets of `rows` rows (f32 activations as the kernels take)."""
    import jax
    import jax.numpy as jnp
    if rows not in self._inputs:
      keys = iter(jax.random.split(jax.random.key(rows), 8 * _MATRICES.value))
      normal = lambda *shape: jax.random.normal(next(keys), shape)
      self._inputs[rows] = [dict(
          h=normal(rows, self.d), w_norm=1 + 0.1 * normal(self.d), g=normal(rows, self.e),
          ss=jnp.abs(normal(rows, self.h)) * 64, w_gate=1 + 0.1 * normal(self.e),
          h_res=normal(rows, self.d)) for _ in range(_MATRICES.value)]
      for x in self._inputs[rows]:   # XLA's einsum inputs, already in cd
        x["u"], x["y"] = x["h"].astype(jnp.bfloat16), x["g"].astype(jnp.bfloat16)
    return self._inputs[rows]

  def time_us(self, fn, rows: int, weights: list) -> tuple[float, list, float | None]:
    """Median us per call of fn(inputs, weight) over the call chain; its outputs; and with
    --profile_dir, the GPU kernels' busy us per call (None otherwise)."""
    import jax

    from ma2mba_jax.bench import common
    inputs = self.inputs(rows)

    @jax.jit
    def chain(inputs, weights):
      return [fn(x, w) for x, w in zip(inputs, weights, strict=True)]

    outs = jax.block_until_ready(chain(inputs, weights))

    def batch():
      for _ in range(_DISPATCHES.value):
        out = chain(inputs, weights)
      return out

    ms = common.median_ms(batch, warmup=1, repeats=_REPEATS.value)
    gpu_us = None
    if _PROFILE.value:
      from ma2mba_jax.bench import kernel_profile
      self.profiled += 1
      rows_ = kernel_profile.profile(lambda: chain(inputs, weights),
                                     f"{_PROFILE.value}/{self.profiled}", calls=2)
      if rows_:
        gpu_us = sum(r["us/call"] for r in rows_) / len(inputs)
    return ms * 1e3 / (_DISPATCHES.value * len(inputs)), outs, gpu_us

  # ---- the references (f32-accumulated einsums of the same cd-rounded inputs)

  def u_in(self, x, dtype):
    """in_proj's input: rmsnorm(h) * w rounded to dtype [R, D]."""
    import jax
    import jax.numpy as jnp
    h = x["h"]
    scale = jax.lax.rsqrt(jnp.mean(h * h, axis=1) + EPS)
    return (h * scale[:, None] * x["w_norm"][None, :]).astype(dtype)

  def u_out(self, x, dtype):
    """out_proj's input: the gated norm's g / rms(group) * w rounded to dtype [R, E]."""
    import jax
    import jax.numpy as jnp
    r = x["g"].shape[0]
    group = self.e // self.g
    ss = x["ss"].reshape(r, self.g, -1).sum(-1)
    scale = jnp.repeat(jax.lax.rsqrt(ss / group + EPS), group, axis=1)
    return (x["g"] * scale * x["w_gate"][None, :]).astype(dtype)

  def ref_in(self, x, w_kn):
    import jax.numpy as jnp
    return jnp.einsum("rd,dn->rn", self.u_in(x, w_kn.dtype), w_kn,
                      preferred_element_type=jnp.float32)

  def ref_out(self, x, w_kn):
    import jax.numpy as jnp
    return jnp.einsum("re,ed->rd", self.u_out(x, w_kn.dtype), w_kn,
                      preferred_element_type=jnp.float32)

  @staticmethod
  def _mulsum(u, w_nk):
    """u [R, K] @ w_nk^T as XLA's multiply-and-reduce, rounded to w_nk's dtype."""
    import jax.numpy as jnp
    f32 = jnp.float32
    return jnp.sum(w_nk[None].astype(f32) * u[:, None, :].astype(f32), axis=2).astype(w_nk.dtype)

  def mulsum_in(self, x, w_nk):
    return self._mulsum(self.u_in(x, w_nk.dtype), w_nk)

  def mulsum_out(self, x, w_nk):
    import jax.numpy as jnp
    return x["h_res"] + self._mulsum(self.u_out(x, w_nk.dtype), w_nk).astype(jnp.float32)

  # ---- one measurement

  def xla(self, kernel: str, layout: str, rows: int) -> dict:
    """XLA's einsum on the kn or nk layout; layout "read": the nk matrix's row sums;
    "mulsum": the kernel's whole job as XLA's multiply-and-reduce; "reduce" (in_proj):
    gemv.in_proj_reduce."""
    import jax.numpy as jnp

    from ma2mba_jax.kernels.decode.gemv import in_proj_reduce
    if layout == "read":
      weights = self.w_in_nk if kernel == "in_proj" else self.w_out_nk
      nbytes = 2 * self.d * (self.np_ if kernel == "in_proj" else self.e)
      fn = lambda x, w: jnp.sum(w, axis=1, dtype=jnp.float32)
    elif layout == "reduce":
      # gemv.in_proj_reduce as the fused_reduce step calls it: u (h * w in cd) and h in,
      # f32 out (the sum of squares of h in column N).
      weights, nbytes = self.w_in_nk, 2 * self.d * self.np_
      fn = lambda x, w: in_proj_reduce(x["u"], x["h"], w, self.n)
    elif layout == "mulsum":
      # The kernels' whole job (norm, matmul, rounding, residual) with the matmul written as
      # XLA's multiply-and-reduce of the nk matrix (a reduction fusion, not a dot).
      weights = self.w_in_nk if kernel == "in_proj" else self.w_out_nk
      nbytes = 2 * self.d * (self.np_ if kernel == "in_proj" else self.e)
      fn = functools.partial(self.mulsum_in if kernel == "in_proj" else self.mulsum_out)
    elif kernel == "in_proj":
      weights = self.w_in_kn if layout == "kn" else self.w_in_nk
      eq = "rd,dn->rn" if layout == "kn" else "rd,nd->rn"
      fn = lambda x, w: jnp.einsum(eq, x["u"], w, preferred_element_type=jnp.float32)
      nbytes = 2 * self.d * (self.n if layout == "kn" else self.np_)
    else:
      weights = self.w_out_kn if layout == "kn" else self.w_out_nk
      eq = "re,ed->rd" if layout == "kn" else "re,de->rd"
      fn = lambda x, w: jnp.einsum(eq, x["y"], w, preferred_element_type=jnp.float32)
      nbytes = 2 * self.d * self.e
    us, outs, gpu_us = self.time_us(fn, rows, weights)
    err = {}
    if layout == "mulsum":
      from ma2mba_jax.testing import rel_err
      x = self.inputs(rows)[0]
      if kernel == "in_proj":
        err["err"] = rel_err(outs[0][:, :self.n], self.ref_in(x, self.w_in_kn[0]))
      else:
        err["err"] = rel_err(outs[0] - x["h_res"], self.ref_out(x, self.w_out_kn[0]))
    return dict(kernel=kernel, impl=f"xla_{layout}", rows=0 if layout == "read" else rows,
                us=us,
                **{"TB/s": nbytes / us / 1e6}, **_gpu(gpu_us, nbytes), **err)

  def gemv(self, kernel: str, rows: int, config, stage: str) -> dict:
    from ma2mba_jax.kernels.decode import gemv
    from ma2mba_jax.testing import rel_err
    if kernel == "in_proj":
      cfg = gemv.effective("in_proj", rows, self.np_, self.d, 1, config)
      fn = lambda x, w: gemv.in_proj(x["h"], x["w_norm"], w, eps=EPS, config=cfg,
                                     interpret=self.interpret)
      weights, nbytes = self.w_in_nk, 2 * self.d * self.np_
    else:
      cfg = gemv.effective("out_proj", rows, self.d, self.e, self.g, config)
      fn = lambda x, w: gemv.out_proj(x["g"], x["ss"], x["w_gate"], w, x["h_res"], eps=EPS,
                                      n_groups=self.g, config=cfg, interpret=self.interpret)
      weights, nbytes = self.w_out_nk, 2 * self.d * self.e
    row = dict(kernel=kernel, impl=gemv.path_of(rows), rows=rows, stage=stage,
               **cfg._asdict())
    try:
      us, outs, gpu_us = self.time_us(fn, rows, weights)
    except Exception as err:  # noqa: BLE001 - a config Triton rejects is a result
      return {**row, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    x = self.inputs(rows)[0]
    if kernel == "in_proj":
      out, ref = outs[0][:, :self.n], self.ref_in(x, self.w_in_kn[0])
    else:
      out, ref = outs[0] - x["h_res"], self.ref_out(x, self.w_out_kn[0])
    return {**row, "us": us, "TB/s": nbytes / us / 1e6, **_gpu(gpu_us, nbytes),
            "err": rel_err(out, ref)}


def _gpu(gpu_us, nbytes) -> dict:
  return {} if gpu_us is None else {"gpu_us": gpu_us, "gpu_TB/s": nbytes / gpu_us / 1e6}


def main(argv):
  del argv
  from ma2mba_jax.bench import common
  from ma2mba_jax.kernels.decode import gemv
  Config = gemv.Config

  bench = Bench(_PRESET.value)
  rows1 = _ROWS.value
  results: list[dict] = []
  payload = dict(env=common.environment(), preset=_PRESET.value,
                 shapes=dict(d=bench.d, e=bench.e, n=bench.n, np=bench.np_, g=bench.g),
                 flags=dict(matrices=_MATRICES.value,
                            dispatches=_DISPATCHES.value, repeats=_REPEATS.value),
                 defaults={f"{k}/{p}": c._asdict() for (k, p), c in gemv.DEFAULTS.items()},
                 rows=results)
  start = time.time()

  def add(row):
    results.append(row)
    print(f"[{time.time() - start:6.1f}s]", " ".join(
        f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in row.items()
        if k not in ("stage",)), flush=True)
    return row

  def out_of_time(reserve=0.0):
    return time.time() > bench.deadline - reserve

  def checkpoint():
    common.write_json(_OUT.value, payload)

  def best(kernel, stage=None, rows=None, n=1):
    ok = [r for r in results if r["kernel"] == kernel and "us" in r
          and not r["impl"].startswith("xla") and (stage is None or r["stage"] == stage)
          and (rows is None or r["rows"] == rows)]
    return sorted(ok, key=lambda r: r.get("gpu_us", r["us"]))[:n]

  def cfg_of(r):
    return Config(*(r[k] for k in Config._fields))

  seen = set()

  def run(kernel, rows, config, stage, reserve=0.0):
    cfg = gemv.effective(kernel, rows, bench.np_ if kernel == "in_proj" else bench.d,
                         bench.d if kernel == "in_proj" else bench.e, bench.g, config)
    if (kernel, rows, cfg) in seen or out_of_time(reserve):
      return
    seen.add((kernel, rows, cfg))
    add(bench.gemv(kernel, rows, cfg, stage))

  for kernel in ("in_proj", "out_proj"):
    for layout in ("kn", "nk", "read", "mulsum") + (("reduce",) if kernel == "in_proj" else ()):
      add(bench.xla(kernel, layout, rows1))

  if _SWEEP.value == "confirm":
    # The defaults at every row path, then their neighbourhood at --rows.
    for kernel in ("in_proj", "out_proj"):
      for rows in sorted({rows1, 2, 4, gemv.ROWS}):
        run(kernel, rows, None, "defaults")
    checkpoint()
    for warps, stages, bn in itertools.product((2, 4), (3, 1), (8, 4, 16)):
      run("in_proj", rows1, Config(bn, 512, 1, warps, stages), "N")
      run("out_proj", rows1, Config(bn // 2, 1024, 1, warps, stages), "N")
    for kernel, bk in (("in_proj", 512), ("out_proj", 1024)):
      for bn in (4, 8):
        run(kernel, rows1, Config(bn, bk, 1, 2, 1, True), "N")
    for warps in (2, 4):
      run("out_proj", rows1, Config(8, 512, 2, warps, 3), "N")
      run("out_proj", rows1, Config(4, 512, 1, warps, 3), "N")
  elif _SWEEP.value == "evict":
    for eviction, ahead in itertools.product((None, "evict_first"), (False, True)):
      for kernel in ("in_proj", "out_proj"):
        base = gemv.DEFAULTS[(kernel, gemv.path_of(rows1))]._replace(
            eviction=eviction, ahead=ahead, programs=0)                  # the grid kernels
        run(kernel, rows1, base, "E")
        run(kernel, rows1, base._replace(num_warps=4, num_stages=1), "E")
        run(kernel, rows1, base._replace(block_n=base.block_n * 2), "E")
        run(kernel, rows1, base._replace(block_k=base.block_k // 2, num_warps=4,
                                         num_stages=1), "E")
  elif _SWEEP.value == "persistent":
    for kernel in ("in_proj", "out_proj"):
      run(kernel, rows1, None, "P")
    shapes = {"in_proj": ((8, 512, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4)),
              "out_proj": ((4, 1024, 4), (8, 1024, 8), (4, 512, 4), (2, 1024, 4))}
    for kernel in ("in_proj", "out_proj"):
      for (bn, bk, warps), programs in itertools.product(shapes[kernel],
                                                         (132, 264, 528, 1056)):
        run(kernel, rows1, Config(bn, bk, 1, warps, 1, eviction="evict_first",
                                  programs=programs), "P")
  elif _SWEEP.value == "defaults":
    for kernel in ("in_proj", "out_proj"):
      for rows in sorted({rows1, 2, 4, gemv.ROWS}):
        run(kernel, rows, None, "defaults")
  else:
    reserve = _RESERVE.value
    # Stage A: block shapes (and split-K for out_proj) at 4 warps: a loop of 1 or 3
    # stages, or unrolled.
    modes = ((1, False), (3, False), (1, True))
    for (stages, unroll), bn, bk in itertools.product(modes, (4, 8, 16, 32), (256, 512)):
      run("in_proj", rows1, Config(bn, bk, 1, 4, stages, unroll), "A", reserve)
    for (stages, unroll), bn, bk in itertools.product(modes, (4, 8, 16, 32), (512, 1024)):
      run("out_proj", rows1, Config(bn, bk, 1, 4, stages, unroll), "A", reserve)
    for bn, split in itertools.product((8, 16, 32), (2, 5, 10)):
      run("out_proj", rows1, Config(bn, 512, split, 4, 1), "A", reserve)
    run("in_proj", rows1, Config(32, 256, 2, 4, 1), "A", reserve)
    run("in_proj", rows1, Config(64, 256, 5, 4, 1), "A", reserve)
    checkpoint()
    # Stage B: warps x stages (or unrolled) for the best of stage A.
    for kernel in ("in_proj", "out_proj"):
      for r in best(kernel, "A", rows1, _TOP.value):
        for warps, (stages, unroll) in itertools.product(
            (2, 4, 8), ((1, False), (2, False), (3, False), (4, False), (1, True))):
          run(kernel, rows1, cfg_of(r)._replace(num_warps=warps, num_stages=stages,
                                                unroll=unroll), "B", reserve)
    checkpoint()
    # Stage C: other row counts; the tl.dot path at 16 rows.
    for kernel in ("in_proj", "out_proj"):
      top = best(kernel, rows=rows1)
      for rows in (2, 4):
        if top:
          run(kernel, rows, cfg_of(top[0]), "C")
      for bn, bk, stages in ((16, 128, 3), (32, 128, 3), (64, 64, 3), (32, 256, 1)):
        run(kernel, gemv.ROWS, Config(bn, bk, 1, 4, stages), "C")
      if not out_of_time():
        add(bench.xla(kernel, "kn", gemv.ROWS))

  print()
  common.print_table(results, COLUMNS)
  for kernel in ("in_proj", "out_proj"):
    for rows in sorted({r["rows"] for r in results}):
      top = best(kernel, rows=rows)
      if top:
        t = top[0]
        print(f"best {kernel} rows={rows}: {cfg_of(t)} {t['us']:.2f} us {t['TB/s']:.2f} TB/s"
              + (f", GPU {t['gpu_us']:.2f} us {t['gpu_TB/s']:.2f} TB/s" if "gpu_us" in t
                 else ""))
  errors = [r for r in results if "error" in r]
  for r in errors:
    print("error", r)
  payload["wall_s"] = time.time() - start
  common.write_json(_JSON.value, payload)


if __name__ == "__main__":
  app.run(main)
