"""Float64 oracle for the SSD scan: the sequential recurrence, one step at a time.

Written to be obviously right rather than fast; tests and the GPU check script compare
every backend against it. Differentiable (jax autodiff through lax.scan).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def ssd_oracle(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=True,
               dt_limit=(0.0, math.inf), initial_state=None, reset=None):
  """Same contract as `ssd.ssd` but computes in float64 step by step.

  `reset` [B, T] (bool or int, optional): where it is set the state is zeroed before the
  step, h_t = (0 if reset_t else exp(dt_t A)) h_{t-1} + dt_t x_t B_t^T.

  Must be called under `jax.enable_x64(True)`. Returns (y [B,T,H,P], final_state [B,H,P,N])
  in float64.
  """
  if not jax.config.jax_enable_x64:
    raise RuntimeError("ssd_oracle computes in float64: call it under jax.enable_x64(True)")
  f64 = jnp.float64
  x, dt, A, B, C = (jnp.asarray(a, f64) for a in (x, dt, A, B, C))
  batch, seqlen, n_heads, head_dim = x.shape
  n_groups, d_state = B.shape[2:]
  group_of_head = jnp.arange(n_heads) // (n_heads // n_groups)

  if dt_bias is not None:
    dt = dt + jnp.asarray(dt_bias, f64)
  if dt_softplus:
    dt = jnp.logaddexp(dt, 0.0)  # softplus
  dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
  if D is None:
    D = jnp.zeros((n_heads, 1), f64)
  D = jnp.asarray(D, f64).reshape(n_heads, -1)
  h = (jnp.zeros((batch, n_heads, head_dim, d_state), f64) if initial_state is None
       else jnp.asarray(initial_state, f64))

  reset = (jnp.zeros((batch, seqlen), bool) if reset is None
           else jnp.asarray(reset) != 0)             # [b, t]

  def step(h, inputs):
    x_t, dt_t, B_t, C_t, r_t = inputs               # [b,h,p], [b,h], [b,g,n], [b,g,n], [b]
    B_t = B_t[:, group_of_head]                     # [b, h, n]
    C_t = C_t[:, group_of_head]                     # [b, h, n]
    decay = jnp.where(r_t[:, None], 0.0, jnp.exp(dt_t * A))   # [b, h]
    h = decay[:, :, None, None] * h + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    y_t = jnp.einsum("bhpn,bhn->bhp", h, C_t) + D * x_t
    return h, y_t

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  h, y = jax.lax.scan(step, h, (time_major(x), time_major(dt), time_major(B), time_major(C),
                                 time_major(reset)))
  return jnp.moveaxis(y, 0, 1), h
