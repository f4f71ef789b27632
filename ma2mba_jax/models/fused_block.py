"""One Mamba-2 block (sequence mode) as a single `jax.custom_vjp` with its own backward.

    h_out = h + out_proj(gated_norm(SSD(conv1d_silu(in_proj(rms_norm(h)))), z))

Autodiff of `Mamba2Block` keeps every intermediate the chain rule touches (f32 conv
products, f32 gate and norm intermediates, the SSD's inputs and output, f32 copies of the
residual stream): about 380 KB per token per layer at the 2.7B shapes in bf16. This block
keeps only what its backward cannot cheaply recompute:

    h        [B, T, D] f32          the block input (the RMSNorm backward needs it)
    zxbcdt   [B, T, F] compute dtype the in_proj output (F = 2E + 2GN + H)
    conv_state, ssm_state           the input states (per sequence, not per token)

(and the layer's parameters, which are inputs anyway). The backward recomputes the
input norm (elementwise), the conv1d + SiLU, the SSD forward and the gated norm from zxbcdt
(one layer's worth alive at a time), through `jax.vjp` of `_mix`, a plain function from
zxbcdt and the states to the out_proj INPUT, so the recompute does not redo a matmul; the
out_proj and in_proj weight and input gradients are explicit matmuls with the dtypes that
autodiff of the forward's `Linear` uses (compute-dtype inputs, f32 accumulation, the
result rounded to the compute dtype).

Every input is differentiable: the parameters, h and both input states (MA-GC's cells
need the states' gradients and pass in the output states' cotangents); `reset` (packed
segments, [B, T] bool) is not, and gets no cotangent.

Remat: a policy of an outer `jax.checkpoint` sees this block's forward rule, so the
residual zxbcdt carries the tag `mamba2_in_proj` and the out_proj output `mamba2_out_proj`
(`cell_saves=names` can keep them; `dots` keeps both matmul outputs, in f32). The tags
`mamba2_conv` and `mamba2_ssd` exist only in the primal function: the backward here never
reads a conv or SSD output that a policy could have kept, it recomputes them.

Axis letters as in mamba2.py: B batch, T time, D model width, E inner width, F in_proj
width, C conv channels, K conv kernel, H heads, P head dim, N state size, G groups.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par
from ma2mba_jax.models.mamba2 import (Mamba2Config, rms_normalize, causal_conv,
                                      gated_rms_norm)

Array = jax.Array
f32 = jnp.float32


class BlockParams(NamedTuple):
  """One layer's parameters as plain arrays (the same tensors as `Mamba2Block`'s)."""
  norm: Array          # [D]     norm.weight
  in_proj: Array       # [D, F]  mixer.in_proj.kernel
  conv_weight: Array   # [K, C]  mixer.conv_weight
  conv_bias: Array     # [C]     mixer.conv_bias
  dt_bias: Array       # [H]     mixer.dt_bias
  A_log: Array         # [H]     mixer.A_log
  D: Array             # [H]     mixer.D
  gated_norm: Array    # [E]     mixer.norm.weight
  out_proj: Array      # [E, D]  mixer.out_proj.kernel


def block_params(block) -> BlockParams:
  """The arrays of a `Mamba2Block` (any leading axes are kept)."""
  m = block.mixer
  return BlockParams(norm=block.norm.weight[...], in_proj=m.in_proj.kernel[...],
                     conv_weight=m.conv_weight[...], conv_bias=m.conv_bias[...],
                     dt_bias=m.dt_bias[...], A_log=m.A_log[...], D=m.D[...],
                     gated_norm=m.norm.weight[...], out_proj=m.out_proj.kernel[...])


# --------------------------------------------------------------------------- pieces


def _dot_cd(spec: str, a: Array, b: Array, cd) -> Array:
  """einsum of two cd operands, f32 accumulation, the result written in cd by the matmul
  itself (cuBLAS and XLA's Triton GEMMs accumulate bf16 products in f32 and round on output):
  the numbers of an f32 result rounded afterwards, without writing and reading back the f32
  result (issue 15: 2.7B MA-GC at 2^19 on an H100, 2.945 -> 2.810 s a step at 16 layers,
  BENCHMARKS.md)."""
  return jnp.einsum(spec, a, b, preferred_element_type=cd)


def _linear(x: Array, kernel: Array, cd) -> Array:
  """`Linear.__call__`: x [..., I] @ kernel [I, O] in cd, f32 accumulation, out in cd."""
  return _dot_cd("...i,io->...o", x.astype(cd), kernel.astype(cd), cd)


def _linear_backward(x: Array, kernel: Array, g: Array, cd) -> tuple[Array, Array]:
  """Gradients of `_linear` for the output cotangent g [..., O] -> (dx [..., I] in cd,
  dkernel [I, O] in kernel.dtype), computed as autodiff computes them: cd inputs, f32
  accumulation, each result rounded to cd (then dkernel to the parameter dtype)."""
  g = g.astype(cd)
  dx = _dot_cd("...o,io->...i", g, kernel.astype(cd), cd)
  lead = "".join("abcdefgh"[i] for i in range(x.ndim - 1))
  dkernel = _dot_cd(f"{lead}i,{lead}o->io", x.astype(cd), g, cd)
  return dx, dkernel.astype(kernel.dtype)


def _norm_in(h: Array, weight: Array, eps: float, cd) -> Array:
  """The block's pre-norm: h [B, T, D] f32, weight [D] -> u [B, T, D] in cd."""
  return (rms_normalize(h, eps) * weight.astype(f32)).astype(cd)


def _mix(config: Mamba2Config, mix_params: tuple, zxbcdt: Array, conv_state: Array,
         ssm_state: Array, reset: Array | None = None, *, tag: bool = False
         ) -> tuple[Array, Array, Array]:
  """From the in_proj output to the out_proj input (no matmul inside).

  Args:
    mix_params: (conv_weight [K, C], conv_bias [C], dt_bias [H], A_log [H], D [H],
      gated_norm [E]).
    zxbcdt: [B, T, F] in the compute dtype.
    conv_state: [B, C, K-1] f32; ssm_state: [B, H, P, N] f32.
    reset: [B, T] bool or None (packed segments: the conv and SSD restart where True).

  Returns:
    gated_norm(y, z) [B, T, E] in the compute dtype, new conv_state, new ssm_state.
  """
  c = config
  conv_weight, conv_bias, dt_bias, A_log, D, gated_norm = mix_params
  z, xBC, dt = jnp.split(zxbcdt, [c.d_inner, c.d_inner + c.conv_dim], axis=-1)
  # Under a sequence mesh axis: the previous piece's inputs, the stitched SSD (mamba2.py).
  xBC, conv_state = causal_conv(xBC, seq_par.conv_state_in_context(xBC, conv_state, reset),
                                conv_weight, conv_bias, reset)   # [B, T, C]
  conv_state = seq_par.last_piece_state(conv_state)
  if tag:
    xBC = checkpoint_name(xBC, "mamba2_conv")
  gn = c.n_groups * c.d_state
  x, B, C = jnp.split(xBC, [c.d_inner, c.d_inner + gn], axis=-1)
  lead = xBC.shape[:-1]
  x = x.reshape(lead + (c.n_heads, c.head_dim))                  # [B, T, H, P]
  B = B.reshape(lead + (c.n_groups, c.d_state))                  # [B, T, G, N]
  C = C.reshape(lead + (c.n_groups, c.d_state))                  # [B, T, G, N]
  A = -jnp.exp(A_log.astype(f32))                                # [H]
  y, ssm_state = seq_par.ssd_in_context(
      x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=c.dt_limit,
      initial_state=ssm_state, chunk_len=c.chunk_len, impl=c.ssd_impl,
      reset=reset)                                               # y: [B, T, H, P]
  if tag:
    y = checkpoint_name(y, "mamba2_ssd")
  normed = gated_rms_norm(y.reshape(z.shape), z, gated_norm, c.n_groups, c.norm_eps)
  return normed.astype(c.compute_dtype), conv_state, ssm_state


def _mix_params(p: BlockParams) -> tuple:
  return (p.conv_weight, p.conv_bias, p.dt_bias, p.A_log, p.D, p.gated_norm)


def _forward(config: Mamba2Config, p: BlockParams, h: Array, conv_state: Array,
             ssm_state: Array, reset: Array | None, *, tag_all: bool):
  """-> ((h_out, conv_state, ssm_state), zxbcdt)."""
  cd = config.compute_dtype
  u = _norm_in(h, p.norm, config.norm_eps, cd)                   # [B, T, D]
  zxbcdt = checkpoint_name(_linear(u, p.in_proj, cd), "mamba2_in_proj")  # [B, T, F]
  normed, conv_state, ssm_state = _mix(config, _mix_params(p), zxbcdt, conv_state,
                                       ssm_state, reset, tag=tag_all)  # [B, T, E]
  out = checkpoint_name(_linear(normed, p.out_proj, cd), "mamba2_out_proj")  # [B, T, D]
  return (h + out.astype(f32), conv_state, ssm_state), zxbcdt


# --------------------------------------------------------------------------- the custom_vjp


# `reset` ([B, T] bool or None) is an ordinary argument, not a nondiff_argnum (it is traced);
# the backward returns None for it: it has no cotangent.
# `context` is the `sequence_axis` the forward ran under (None: none): the backward rule is
# traced later, when the context around it may differ (MA-GC's pipeline switches it off
# for its groups, remat/pipeline.py), and must recompute what the forward computed.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(config: Mamba2Config, context: tuple[str, int] | None, p: BlockParams, h: Array,
           conv_state: Array, ssm_state: Array, reset: Array | None
           ) -> tuple[Array, Array, Array]:
  del context  # the current one
  return _forward(config, p, h, conv_state, ssm_state, reset, tag_all=True)[0]


def _fused_fwd(config, context, p, h, conv_state, ssm_state, reset):
  del context
  outs, zxbcdt = _forward(config, p, h, conv_state, ssm_state, reset, tag_all=False)
  return outs, (p, h, zxbcdt, conv_state, ssm_state, reset)


def _fused_bwd_in_context(config, context, residuals, cotangents):
  with seq_par.sequence_axis(*(context or (None, 1))):
    return _fused_bwd(config, residuals, cotangents)


def _fused_bwd(config, residuals, cotangents):
  p, h, zxbcdt, conv_state, ssm_state, reset = residuals
  dh_out, dconv_out, dssm_out = cotangents                       # [B,T,D], states
  cd = config.compute_dtype
  # Recompute conv, SSD and gated norm from zxbcdt (no matmul), keeping their vjp.
  mix = functools.partial(_mix, config, reset=reset)
  (normed, _, _), mix_vjp = jax.vjp(mix, _mix_params(p), zxbcdt, conv_state, ssm_state)
  # h_out = h + out.astype(f32), out = normed @ out_proj.
  dnormed, dout_proj = _linear_backward(normed, p.out_proj, dh_out.astype(cd), cd)
  dmix, dzxbcdt, dconv, dssm = mix_vjp((dnormed, dconv_out, dssm_out))
  # zxbcdt = u @ in_proj, u = norm_in(h).
  u, norm_vjp = jax.vjp(lambda h, w: _norm_in(h, w, config.norm_eps, cd), h, p.norm)
  du, din_proj = _linear_backward(u, p.in_proj, dzxbcdt, cd)
  dh_norm, dnorm = norm_vjp(du)
  conv_weight, conv_bias, dt_bias, A_log, D, gated_norm = dmix
  dp = BlockParams(norm=dnorm, in_proj=din_proj, conv_weight=conv_weight,
                   conv_bias=conv_bias, dt_bias=dt_bias, A_log=A_log, D=D,
                   gated_norm=gated_norm, out_proj=dout_proj)
  return dp, dh_out + dh_norm, dconv, dssm, None


_fused.defvjp(_fused_fwd, _fused_bwd_in_context)


def fused_block_apply(config: Mamba2Config, p: BlockParams, h: Array, conv_state: Array,
                      ssm_state: Array, reset: Array | None = None
                      ) -> tuple[Array, Array, Array]:
  """`Mamba2Block.__call__` with the memory-lean backward.

  Args:
    p: the layer's parameters (see `block_params`).
    h: [B, T, D] (any float dtype; the residual stream is f32), any T >= 1.
    conv_state: [B, C, K-1]; ssm_state: [B, H, P, N] (f32 after the cast here).
    reset: [B, T] bool (or int, nonzero = True), optional: True where a packed segment
      starts. Not differentiable.

  Returns:
    (h [B, T, D] f32, conv_state [B, C, K-1] f32, ssm_state [B, H, P, N] f32).
  """
  if reset is not None:
    reset = jnp.asarray(reset)
    reset = reset if reset.dtype == jnp.bool_ else reset != 0
  return _fused(config, seq_par.current_axis(), p, h.astype(f32), conv_state.astype(f32),
                ssm_state.astype(f32), reset)
