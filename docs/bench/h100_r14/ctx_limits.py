"""Session 14 exploration (not a library entry point): does the decode slowdown after a
large LM computation (session 13, after_prefill.py) follow a per-context CUDA setting that
the computation changes, or the executable staying loaded?

Prints the CUDA context's limits (cuCtxGetLimit through the driver API: stack size a
thread, printf FIFO, malloc heap, persisting L2) and free memory at the start and after
each stage, and times greedy 3.1B answers (after_prefill.rates: 256 and 1024 tokens, the
marginal ms a token) after each. Stages (env ORDER, comma-separated, in order):
  lm          the LM layers on 9,216 tokens, 4 times (after_prefill's 'lm'), kept
  lmdel       the same compiled ahead (lower().compile()), run 4 times, then the compiled
              executable deleted and gc'd (its module unloaded if nothing else holds it)
  stack_reset cuCtxSetLimit(STACK_SIZE, the value at the start)
  stack_big   cuCtxSetLimit(STACK_SIZE, 16 KiB) with no large executable
              (call a ran lmdel,stack_reset and stack_big,stack_reset; a process ended in
              CUDA_ERROR_LAUNCH_FAILED and its output was lost: setting the limit under
              XLA's live CUDA graphs may be what failed. Calls b-g only read the limits.)
  tiny, alloc after_prefill's stages (many small executables; a 20 GiB make-and-free)
  clear       jax.clear_caches() and gc
  mm_cublas / mm_triton / mm_auto  a [9216, 2560] @ [2560, 10752] bf16 matmul 4 times,
              XLA's Triton GEMMs off (cuBLAS), cuBLAS fallback off (Triton), or as XLA picks
  cumsum      exp(cumsum) over [9216, 80, 256] f32 and its sum (XLA fusions, no matmul)
  ssd_IMPL_T  the SSD forward alone (kernels.ssd.api.ssd, impl=IMPL) at the 2.7B shapes on T
              tokens, 4 times (after_prefill's ssd_IMPL at 9,216 tokens slowed the decode)
  segsum_T    exp(segsum(dA)) of the plain-XLA SSD alone (reference.segsum) on T tokens in
              chunks of 256, 80 heads, and its sum
  bmm_T       the plain-XLA SSD's two batched einsums of the diagonal blocks alone (scores
              = C B^T per chunk, then scores @ x) on T tokens
  lmssd_IMPL  the LM layers (a 2.7B LM, random weights) with ssd_impl=IMPL on 9,216 tokens,
              4 times (the lm stage's LM runs ssd_impl "auto", which is "triton" on GPU)
  l2reset     cuCtxResetPersistingL2Cache (L2 lines kept as persisting, e.g. by evict_last
              loads, back to normal; session 15)
  flush       a 1 GiB bf16 array read and written twice (every normal L2 line replaced;
              session 15)
  carve_shared / carve_l1  a no-op kernel (our own PTX, through the driver API) launched on
              every SM: with 200 KiB of dynamic shared memory (the SMs' shared memory
              carveout at its largest, as large Triton kernels need), or with the carveout
              preference 0 (the most L1); does the decode's speed follow the carveout
              the last kernel left? (session 15)
  lmunrolled  the LM layers on 9,216 tokens as the Streamer's layer_loop="unrolled" runs them
              (models/decode.apply_layers on per-layer weights: no XLA while loop over the
              layers; ssd_impl "auto"), 4 times (session 15: is the scan's while loop around
              the jax-triton custom calls the trigger?)
  loop_small / loop_big  a lax.fori_loop of 64 steps (an XLA while loop, as the LM's scan
              over layers and the plain-XLA SSD's scan over chunks have): a [64, 64] f32
              update a step, or a [2048, 2560] @ [2560, 2560] bf16 matmul a step

  ORDER=lmdel,stack_reset python docs/bench/h100_r14/ctx_limits.py
"""
import ctypes
import gc
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "h100_r13"))
import after_prefill as ap  # noqa: E402

from ma2mba_jax.data.tokenizer import vocab_size  # noqa: E402
from ma2mba_jax.infer.sample import Sampler  # noqa: E402
from ma2mba_jax.kernels.ssd.api import ssd  # noqa: E402

LIMITS = {"stack": 0, "printf": 1, "heap": 2, "persisting_l2": 6}
try:
  _cuda = ctypes.CDLL("libcuda.so.1")
except OSError:      # no NVIDIA driver (a CPU smoke run): no limits to read or set
  _cuda = None


class _Ctx:
  """The device's primary context (the one XLA uses) made current on this thread."""

  def __enter__(self):
    dev, self.ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(_cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    _check(_cuda.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "PrimaryCtxRetain")
    self.dev = dev
    _check(_cuda.cuCtxPushCurrent_v2(self.ctx), "cuCtxPushCurrent")
    return self

  def __exit__(self, *exc):
    popped = ctypes.c_void_p()
    _cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))
    _cuda.cuDevicePrimaryCtxRelease_v2(self.dev)


def _check(code, what):
  if code != 0:
    raise RuntimeError(f"{what} returned CUDA error {code}")


def limits() -> dict:
  if _cuda is None:
    return {}
  with _Ctx():
    out = {}
    for name, code in LIMITS.items():
      v = ctypes.c_size_t()
      out[name] = v.value if _cuda.cuCtxGetLimit(ctypes.byref(v), code) == 0 else None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    out["free_GiB"] = round(free.value / 2 ** 30, 2)
  return out


def set_stack(value: int) -> None:
  if _cuda is None:
    return
  with _Ctx():
    _check(_cuda.cuCtxSetLimit(0, ctypes.c_size_t(value)), "cuCtxSetLimit(STACK_SIZE)")


_NOOP_PTX = b""".version 8.0
.target sm_90
.address_size 64
.visible .entry noop()
{
  ret;
}
"""


def launch_noop(shared_bytes: int, carveout: int | None) -> None:
  """Launches the no-op kernel on 132 x 4 blocks with `shared_bytes` of dynamic shared
  memory and the preferred carveout `carveout` (percent of the most shared memory; None:
  unset), then waits for the context."""
  if _cuda is None:
    return
  with _Ctx():
    module, func = ctypes.c_void_p(), ctypes.c_void_p()
    _check(_cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(_NOOP_PTX)),
           "cuModuleLoadData")
    _check(_cuda.cuModuleGetFunction(ctypes.byref(func), module, b"noop"),
           "cuModuleGetFunction")
    if shared_bytes > 48 * 1024:   # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
      _check(_cuda.cuFuncSetAttribute(func, 8, ctypes.c_int(shared_bytes)),
             "cuFuncSetAttribute(max dynamic shared)")
    if carveout is not None:       # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
      _check(_cuda.cuFuncSetAttribute(func, 9, ctypes.c_int(carveout)),
             "cuFuncSetAttribute(carveout)")
    for _ in range(4):
      _check(_cuda.cuLaunchKernel(func, 528, 1, 1, 128, 1, 1, ctypes.c_uint(shared_bytes),
                                  None, None, None), "cuLaunchKernel")
    _check(_cuda.cuCtxSynchronize(), "cuCtxSynchronize")


def main():
  tokenizer, model, zero, logits = ap.decode_setup()
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  results, keep = [], {}
  first = limits()
  print(f"limits at the start: {first}", flush=True)
  ap.rates(sampler, zero, logits, "A before anything", results)
  print(f"limits after the first answers: {limits()}", flush=True)
  layers, llm_params = ap.layers_of(model.llm)
  ids = jax.random.randint(jax.random.key(3), (1, ap.LM_TOKENS), 0, 250)
  for stage in os.environ.get("ORDER", "lmdel,stack_reset").split(","):
    start = time.perf_counter()
    if stage == "lm":
      keep["lm"] = ap.run_four(jax.jit(layers), llm_params, ids, zero)
    elif stage == "lmdel":
      compiled = ap.run_four(jax.jit(layers).lower(llm_params, ids, zero).compile(),
                          llm_params, ids, zero)
      print(f"  limits with the LM executable loaded: {limits()}", flush=True)
      del compiled
      gc.collect()
    elif stage == "stack_reset":
      set_stack(first.get("stack", 1024))
    elif stage == "stack_big":
      set_stack(16384)
    elif stage == "tiny":
      ap.tiny_executables(keep)
    elif stage == "alloc":
      ap.make_and_free()
    elif stage.startswith("mm_"):
      options = {"mm_cublas": {"xla_gpu_enable_triton_gemm": False},
                 "mm_triton": {"xla_gpu_cublas_fallback": False},
                 "mm_auto": None}[stage]
      a = jax.random.normal(jax.random.key(5), (9216, 2560), jnp.bfloat16)
      b = jax.random.normal(jax.random.key(6), (2560, 10752), jnp.bfloat16)
      keep[stage] = ap.run_four(jax.jit(lambda a, b: a @ b, compiler_options=options), a, b)
      text = keep[stage].lower(a, b).compile().as_text()
      print(f"  cublas call: {'cublas' in text}, triton gemm fusion: {'triton_gemm' in text}")
      del a, b
    elif stage == "cumsum":
      x = jax.random.normal(jax.random.key(7), (9216, 80, 256), jnp.float32) * 1e-3
      keep[stage] = ap.run_four(
          jax.jit(lambda x: jnp.sum(jnp.exp(jnp.cumsum(x, axis=0)), axis=0)), x)
      del x
    elif stage.startswith("ssd_"):
      _, impl, tokens = stage.split("_")
      keep[stage] = ap.run_four(jax.jit(lambda *a: ssd(*a, impl=impl)),
                                *ap.ssd_inputs(int(tokens)))
    elif stage.startswith(("segsum_", "bmm_")):
      from ma2mba_jax.kernels.ssd.reference import segsum
      t = int(stage.split("_")[1])
      c, q = t // 256, 256
      keys = jax.random.split(jax.random.key(10), 3)
      if stage.startswith("segsum_"):
        da = -jnp.abs(jax.random.normal(keys[0], (1, 80, c, q), jnp.float32)) * 1e-2
        fn = jax.jit(lambda a: jnp.sum(jnp.exp(segsum(a)), axis=-1))
        args = (da,)
      else:
        cc = jax.random.normal(keys[0], (1, c, q, 80, 128), jnp.float32)
        bb = jax.random.normal(keys[1], (1, c, q, 80, 128), jnp.float32)
        xx = jax.random.normal(keys[2], (1, c, q, 80, 64), jnp.float32)
        fn = jax.jit(lambda cc, bb, xx: jnp.einsum(
            "bhcls,bcshp->bclhp", jnp.einsum("bclhn,bcshn->bhcls", cc, bb), xx))
        args = (cc, bb, xx)
      keep[stage] = ap.run_four(fn, *args)
      del args
    elif stage.startswith("lmssd_"):
      from ma2mba_jax.models.mamba2 import Mamba2LM
      other_layers, other_params = ap.layers_of(Mamba2LM(
          model.llm.config.replace(ssd_impl=stage.split("_")[1]), rngs=nnx.Rngs(0)))
      keep[stage] = ap.run_four(jax.jit(other_layers), other_params, ids, zero)
      del other_params
    elif stage == "lmunrolled":
      from ma2mba_jax.models.decode import apply_layers, decode_weights
      weights = jax.jit(decode_weights)(model.llm)
      block_graphdef = model.llm.split_layers()[0]
      keep[stage] = ap.run_four(
          jax.jit(lambda w, ids, s: apply_layers(block_graphdef, w, model.llm.embed(ids), s)),
          weights, ids, zero)
      del weights
    elif stage.startswith("loop_"):
      n = 64 if stage == "loop_small" else 2048
      w = jax.random.normal(jax.random.key(8), (n if n == 64 else 2560,) * 2, jnp.bfloat16)
      x = jax.random.normal(jax.random.key(9), (n, w.shape[0]), jnp.bfloat16)
      keep[stage] = ap.run_four(jax.jit(lambda x, w: jax.lax.fori_loop(
          0, 64, lambda i, x: jnp.tanh(x @ w).astype(x.dtype), x)), x, w)
      del x, w
    elif stage == "l2reset":
      if _cuda is not None:
        with _Ctx():
          _check(_cuda.cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache")
    elif stage == "flush":
      big = jnp.ones((2 ** 29,), jnp.bfloat16)
      keep[stage] = ap.run_four(jax.jit(lambda x: x * 1.5 + 1.0), big)
      del big
    elif stage == "carve_shared":
      launch_noop(200 * 1024, None)
    elif stage == "carve_l1":
      launch_noop(0, 0)
    elif stage == "clear":
      jax.clear_caches()
      gc.collect()
    else:
      raise ValueError(f"unknown stage {stage!r}")
    print(f"stage {stage}: {time.perf_counter() - start:.1f} s; limits {limits()}", flush=True)
    ap.rates(sampler, zero, logits, f"after {stage}", results)


if __name__ == "__main__":
  main()
