"""Session 11 exploration (not a library entry point): bench.decode's fused_gemv step with
gemv.in_proj and/or gemv.out_proj replaced by XLA's multiply-and-reduce of the same
transposed matrices (a reduction fusion, not a dot; the same norms and roundings), to see
whether XLA's reduction emitter streams the weights faster than the Pallas GEMVs inside
the step:  python docs/bench/h100_r11/decode_reduce.py VARIANT [bench.decode flags]."""
import sys

import jax
import jax.numpy as jnp
from absl import app

from ma2mba_jax.bench import decode
from ma2mba_jax.kernels.decode import gemv

f32 = jnp.float32


def in_proj(h, norm_weight, kernel_t, *, eps, config=None, interpret=False):
  del config, interpret
  scale = jax.lax.rsqrt(jnp.mean(h * h, axis=1, keepdims=True) + eps)       # [R, 1]
  u = (h * scale * norm_weight.astype(f32)).astype(kernel_t.dtype)          # [R, D]
  out = jnp.sum(kernel_t[None].astype(f32) * u[:, None, :].astype(f32), axis=2)
  return out.astype(kernel_t.dtype)                                         # [R, Np]


def out_proj(gated, ss, norm_weight, kernel_t, h, *, eps, n_groups, rows=None, config=None,
             interpret=False):
  del config, interpret
  r, e = gated.shape
  group = e // n_groups
  s = ss.reshape(r, n_groups, -1).sum(-1)                                   # [R, G]
  scale = jnp.repeat(jax.lax.rsqrt(s / group + eps), group, axis=1)         # [R, E]
  u = (gated * scale * norm_weight.astype(f32)).astype(kernel_t.dtype)
  out = jnp.sum(kernel_t[None].astype(f32) * u[:, None, :].astype(f32), axis=2)
  out = h + jax.lax.reduce_precision(out, exponent_bits=8, mantissa_bits=7)
  rows = r if rows is None else rows
  return out if rows == r else jnp.where(jnp.arange(r)[:, None] < rows, out, h)


VARIANTS = {"pallas": (False, False), "reduce_in": (True, False),
            "reduce_out": (False, True), "reduce_both": (True, True)}
name = sys.argv.pop(1)
patch_in, patch_out = VARIANTS[name]
if patch_in:
  gemv.in_proj = in_proj
if patch_out:
  gemv.out_proj = out_proj
print(name, "in_proj", "xla reduce" if patch_in else "pallas",
      "out_proj", "xla reduce" if patch_out else "pallas", flush=True)
sys.argv += [f"--label={name}"]
app.run(decode.main)
