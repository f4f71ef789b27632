"""A small stack of SSD layers with conv and SSM states, for testing remat policies without
the full model: each layer is h + W_out . ssd(causal_conv(h) W_in ...), states carried."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ma2mba_jax.kernels.ssd import ssd

D, H, P, N, K = 8, 2, 4, 4, 3   # width, heads, head dim, state, conv kernel


def init_params(key, n_layers):
  ks = jax.random.split(key, 6)
  s = 0.3
  return dict(
      conv_w=jax.random.normal(ks[0], (n_layers, K, D)) * s,
      w_x=jax.random.normal(ks[1], (n_layers, D, H * P)) * s,
      w_dt=jax.random.normal(ks[2], (n_layers, D, H)) * s,
      w_bc=jax.random.normal(ks[3], (n_layers, D, 2 * N)) * s,
      w_out=jax.random.normal(ks[4], (n_layers, H * P, D)) * s,
      A_log=jax.random.normal(ks[5], (n_layers, H)) * 0.5,
  )


def zero_states(n_layers, batch):
  return (jnp.zeros((n_layers, batch, D, K - 1)), jnp.zeros((n_layers, batch, H, P, N)))


def layer_fn(p, h, conv_state, ssm_state, *, chunk_len=8):
  """h [B, S, D]; conv_state [B, D, K-1]; ssm_state [B, H, P, N]."""
  b, t, _ = h.shape
  h_in = h * jax.lax.rsqrt(jnp.mean(h ** 2, axis=-1, keepdims=True) + 1e-5)   # pre-RMSNorm
  padded = jnp.concatenate([jnp.swapaxes(conv_state, 1, 2), h_in], axis=1)   # [B, K-1+S, D]
  conv = sum(padded[:, k:k + t] * p["conv_w"][k] for k in range(K))
  new_conv_state = jnp.swapaxes(padded[:, -(K - 1):], 1, 2)
  u = jax.nn.silu(conv)
  x = (u @ p["w_x"]).reshape(b, t, H, P)
  bc = (u @ p["w_bc"]).reshape(b, t, 1, 2 * N)
  y, new_ssm = ssd(x, u @ p["w_dt"], -jnp.exp(p["A_log"]), bc[..., :N], bc[..., N:],
                   initial_state=ssm_state, chunk_len=chunk_len, impl="xla")
  return h + y.reshape(b, t, H * P) @ p["w_out"], new_conv_state, new_ssm
