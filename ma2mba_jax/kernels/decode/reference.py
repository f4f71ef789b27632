"""`mixer_step` in plain JAX (impl="xla"): the oracle of the Pallas kernel and the CPU path.
The same operations as `Mamba2Mixer.step` between in_proj and out_proj (its conv, dt and
SSM update functions), with the in_proj output scaled by the pre-norm's 1/rms first and the
gated norm's per-group 1/rms left to the caller (see the package docstring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ma2mba_jax.kernels.decode import Dims, MixerParams, write_bc
from ma2mba_jax.kernels.ssd import process_dt
from ma2mba_jax.models.mamba2 import causal_conv_step

Array = jax.Array
f32 = jnp.float32


def mixer_step(layer: Array, raw: Array, in_scale: Array, params: MixerParams, conv: Array,
               ssm: Array, *, dims: Dims, gated_rows: int | None = None,
               in_norm: tuple[int, float] | None = None, conv_in_place: bool = False,
               bc_prev: Array | None = None) -> tuple[Array, ...]:
  """raw [>=B, >=2E+2GN+H] (the first B rows and 2E+2GN+H columns are read), in_scale [B]
  (with in_norm = (D, eps) only its length is read: 1/rms = rsqrt(raw[:, 2E+2GN+H] / D +
  eps)) ->
  yw [B, E] cd, ss [B, H] f32, conv state of the layer [B, C, K-1] f32, ssm stack
  [L, B, H, P, N] f32 (the layer's slice replaced). gated_rows: return g [gated_rows, E] f32
  and ss [gated_rows, H] instead (rows >= B zero)."""
  cd = dims.compute_dtype
  e, h, p, n, g = dims.d_inner, dims.n_heads, dims.head_dim, dims.d_state, dims.n_groups
  b = in_scale.shape[0]
  if in_norm is not None:   # raw's column after the in_proj outputs: h's sum of squares
    width, eps = in_norm
    ss = raw[:b, 2 * e + 2 * g * n + h].astype(f32)
    in_scale = jax.lax.rsqrt(ss / width + eps)
  zxbcdt = (raw[:b].astype(jnp.float32) * in_scale[:, None]).astype(cd)
  z, xBC = zxbcdt[:, :e], zxbcdt[:, e:2 * e + 2 * g * n]
  dt = zxbcdt[:, 2 * e + 2 * g * n:2 * e + 2 * g * n + h]              # (raw may be padded)
  conv_state = jax.lax.dynamic_index_in_dim(conv, layer, 0, keepdims=False)
  xBC, conv_state = causal_conv_step(xBC, conv_state, params.conv_weight, params.conv_bias)
  x, B, C = jnp.split(xBC, [e, e + g * n], axis=-1)
  x = x.reshape(b, h, p).astype(f32)
  B = jnp.repeat(B.reshape(b, g, n).astype(f32), h // g, axis=1)        # [B, H, N]
  C = jnp.repeat(C.reshape(b, g, n).astype(f32), h // g, axis=1)        # [B, H, N]
  dt = process_dt(dt, params.dt_bias, True, dims.dt_limit)             # [B, H] f32
  A = -jnp.exp(params.A_log.astype(f32))                                # [H]
  state = jax.lax.dynamic_index_in_dim(ssm, layer, 0, keepdims=False)  # [B, H, P, N]
  state = (jnp.exp(dt * A)[:, :, None, None] * state
           + (dt[:, :, None] * x)[..., None] * B[:, :, None, :])
  y = jnp.sum(state * C[:, :, None, :], axis=-1) + params.D.astype(f32)[:, None] * x
  gated = y.astype(cd).astype(f32) * jax.nn.silu(z.astype(f32).reshape(b, h, p))
  ss = jnp.sum(jnp.square(gated), axis=-1)                             # [B, H]
  ssm = jax.lax.dynamic_update_index_in_dim(ssm, state, layer, 0)
  conv_out = (conv_state,)
  if conv_in_place:   # x's taps into the stack; B/C's returned (the previous layer's in)
    conv = jax.lax.dynamic_update_slice(conv, conv_state[None, :, :e], (layer, 0, 0, 0))
    if bc_prev is not None:
      conv = write_bc(conv, layer - 1, bc_prev, dims)
    conv_out = (conv, conv_state[:, e:])
  elif bc_prev is not None:
    raise ValueError("decode mixer_step: bc_prev needs conv_in_place=True")
  if gated_rows is not None:  # g itself in f32, rows padded with zeros
    pad = ((0, gated_rows - b), (0, 0))
    return jnp.pad(gated.reshape(b, e), pad), jnp.pad(ss, pad), conv_out[0], ssm, *conv_out[1:]
  yw = (gated.reshape(b, e) * params.norm_weight.astype(f32)).astype(cd)
  return yw, ss, conv_out[0], ssm, *conv_out[1:]
