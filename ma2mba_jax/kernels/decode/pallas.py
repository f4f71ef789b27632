"""`mixer_step` as one Pallas kernel (impl="pallas"; Triton lowering on GPU, the Pallas
interpreter elsewhere). One program per (batch row b, head h) does the whole middle of the
layer for its head: the conv of its P x channels and of its group's N B- and N C-channels
(every head of a group recomputes those 2N, a few hundred multiply-adds), dt, the [P, N]
state update and readout, the gating and the head's sum of squares. The SSM state stack is
aliased to the output, so the layer's slice is updated in place; the conv state goes to a
fresh [B, C, K-1] output (the B/C channels are read by every head of a group, so no program
may overwrite them in place). Refs are whole arrays, indexed by program id; every load is a
vector of P or N elements (powers of two, as Triton needs)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ma2mba_jax.kernels.decode import Dims, MixerParams

Array = jax.Array
f32 = jnp.float32


def _silu(v):
  return v / (1.0 + jnp.exp(-v))


def _softplus(v):
  # jax.nn.softplus's formula (logaddexp(v, 0)).
  return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _kernel(layer_ref, raw_ref, scale_ref, conv_w_ref, conv_b_ref, dt_bias_ref, a_log_ref,
            d_ref, norm_w_ref, conv_ref, ssm_ref,
            yw_ref, ss_ref, conv_out_ref, ssm_out_ref, *, dims: Dims, gated_out: bool):
  e, p, n, g, k = dims.d_inner, dims.head_dim, dims.d_state, dims.n_groups, dims.d_conv
  hpg = dims.n_heads // g
  cd = dims.compute_dtype
  b = pl.program_id(0)
  h = pl.program_id(1)
  layer = layer_ref[0]
  scale = scale_ref[b]

  def proj(start, size):
    """The in_proj output's [start, start + size) of row b, as Linear rounds it."""
    return (raw_ref[b, pl.ds(start, size)].astype(f32) * scale).astype(cd).astype(f32)

  def conv(c0, size, write: bool):
    """silu(conv) of conv channels [c0, c0 + size), rounded to cd; writes their new
    conv state when `write`."""
    taps = [conv_ref[layer, b, pl.ds(c0, size), j].astype(cd).astype(f32)
            for j in range(k - 1)]
    taps.append(proj(e + c0, size))
    out = conv_b_ref[pl.ds(c0, size)].astype(f32)
    for j in range(k):
      out = out + taps[j] * conv_w_ref[j, pl.ds(c0, size)].astype(f32)
    if write:
      for j in range(k - 1):
        conv_out_ref[b, pl.ds(c0, size), j] = taps[j + 1]
    return _silu(out).astype(cd).astype(f32)

  x = conv(h * p, p, True)                                       # [P]
  group = h // hpg
  first_of_group = h % hpg == 0
  # B and C: every head of the group computes them; the group's first head writes their
  # conv state.
  bc0, cc0 = e + group * n, e + g * n + group * n
  bmat = conv(bc0, n, False)                                     # [N]
  cmat = conv(cc0, n, False)                                     # [N]

  @pl.when(first_of_group)
  def _():
    conv(bc0, n, True)
    conv(cc0, n, True)

  dt = _softplus(proj(2 * e + 2 * g * n + h, 1)[0] + dt_bias_ref[h].astype(f32))
  lo, hi = dims.dt_limit
  if lo > 0.0 or hi != float("inf"):
    dt = jnp.clip(dt, lo, hi)
  a = -jnp.exp(a_log_ref[h].astype(f32))
  state = ssm_ref[layer, b, h]                                   # [P, N] f32
  state = jnp.exp(dt * a) * state + (dt * x)[:, None] * bmat[None, :]
  ssm_out_ref[layer, b, h] = state
  y = jnp.sum(state * cmat[None, :], axis=1) + d_ref[h].astype(f32) * x
  gated = y.astype(cd).astype(f32) * _silu(proj(h * p, p))        # [P]
  ss_ref[b, h] = jnp.sum(gated * gated)
  if gated_out:
    yw_ref[b, pl.ds(h * p, p)] = gated
  else:
    yw_ref[b, pl.ds(h * p, p)] = (gated * norm_w_ref[pl.ds(h * p, p)].astype(f32)).astype(cd)


@functools.partial(jax.jit, static_argnames=("dims", "interpret", "num_warps", "gated_rows"))
def mixer_step(layer: Array, raw: Array, in_scale: Array, params: MixerParams, conv: Array,
               ssm: Array, *, dims: Dims, interpret: bool = False, num_warps: int = 4,
               gated_rows: int | None = None) -> tuple[Array, Array, Array, Array]:
  """See the package docstring; the ssm stack is updated in place (aliased). raw: [R, >=
  2E+2GN+H] in any float dtype, rows >= B = in_scale's length never read."""
  batch = in_scale.shape[0]
  c = dims.d_inner + 2 * dims.n_groups * dims.d_state
  layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
  rows = batch if gated_rows is None else gated_rows
  first = (jax.ShapeDtypeStruct((rows, dims.d_inner), dims.compute_dtype) if gated_rows is None
           else jax.ShapeDtypeStruct((rows, dims.d_inner), f32))
  out_shape = [first,                                                            # yw | g
               jax.ShapeDtypeStruct((rows, dims.n_heads), f32),                  # ss
               jax.ShapeDtypeStruct((batch, c, dims.d_conv - 1), f32),           # conv
               jax.ShapeDtypeStruct(ssm.shape, f32)]                             # ssm
  inputs = (layer, raw, in_scale.astype(f32), *params, conv, ssm)
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  return tuple(pl.pallas_call(
      functools.partial(_kernel, dims=dims, gated_out=gated_rows is not None),
      grid=(batch, dims.n_heads), out_shape=out_shape,
      input_output_aliases={len(inputs) - 1: 3}, interpret=interpret, **kwargs)(*inputs))
