"""The LM's recurrent step laid out for fast decoding: per-layer weights, an unrolled loop.

Decoding one token at batch 1 reads every weight once: about 5.4 GB for the 2.7B LM in
bf16, 1.6 ms at the H100's 3.35 TB/s. `Mamba2LM.step` (the reference) scans a stacked
block over the layer axis; each scan iteration dynamic-slices its layer's matrices out of
the [L, ...] stacks, which XLA may copy (read + write + read again) before the GEMV, and a
while loop of L iterations runs on the host. Here the layer loop is unrolled over weights
split per layer ONCE, before a decode loop (`decode_weights`), so each GEMV reads its
layer's own buffer; the matmul kernels are stored in the compute dtype (the same values
`Linear` casts to at every call, so the logits are the reference's), never cast per token.

    weights = jax.jit(decode_weights)(llm)                  # once: a copy of the matrices
    logits, cache = decode_step(llm.config, block_graphdef, weights, token, cache)

Axis legend: B batch, D model width, V (padded) vocabulary, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ma2mba_jax.kernels import decode as mixer_kernels
from ma2mba_jax.models.mamba2 import (LayerStates, Mamba2Config, Mamba2LM, rms_normalize,
                                      block_apply, block_step)

Array = jax.Array
f32 = jnp.float32
# Leaves of a block's state that are matmul kernels (cast to the compute dtype by Linear).
_MATMUL_KERNELS = ("in_proj", "out_proj")


class DecodeWeights(NamedTuple):
  """Mamba2LM's weights as `decode_step` reads them.

  embedding: [V, D] as stored (the token lookup reads rows of it, as `Mamba2LM.embed`).
  head: the logits matrix in the compute dtype: the embedding [V, D] when tied, else the
    lm_head kernel [D, V].
  final_norm: [D].
  layers: L states of one Mamba2Block (no layer axis), in_proj / out_proj kernels in the
    compute dtype, everything else as stored.
  """
  embedding: Array
  head: Array
  final_norm: Array
  layers: tuple[nnx.State, ...]


def decode_weights(llm: Mamba2LM, transposed: bool = False) -> DecodeWeights:
  """The LM's weights split per layer, matmul kernels cast to the compute dtype. Run it
  jitted, once per model: the result holds a copy of the layer matrices (one more copy of
  the LM's weights in device memory while it is kept).

  transposed: store in_proj [N, D] and out_proj [D, E] output-major (for
  `fused_decode_step`, not `decode_step`): a single token's product then reads whole
  contiguous rows of the contraction, which XLA's GPU GEMV streams faster (the tied
  [V, D] head already reads that way: 2.9 TB/s against 2.0 for the [D, N] layout on an
  H100, BENCHMARKS.md)."""
  c = llm.config
  cd = c.compute_dtype
  _, stacked = llm.split_layers()

  def layer(i: int) -> nnx.State:
    def pick(path, a):
      a = a[i]
      names = jax.tree_util.keystr(path)
      if not any(n in names for n in _MATMUL_KERNELS):
        return a
      return a.astype(cd).T if transposed else a.astype(cd)
    return jax.tree_util.tree_map_with_path(pick, stacked)

  head = llm.embedding[...] if c.tie_embeddings else llm.lm_head.kernel[...]
  return DecodeWeights(embedding=llm.embedding[...], head=head.astype(cd),
                       final_norm=llm.final_norm.weight[...],
                       layers=tuple(layer(i) for i in range(c.n_layers)))


def decode_step(config: Mamba2Config, block_graphdef: nnx.GraphDef, weights: DecodeWeights,
                token: Array, cache: LayerStates) -> tuple[Array, LayerStates]:
  """`Mamba2LM.step` on `decode_weights`: token int32 [B] and the cache -> (logits [B, V]
  f32, new cache). block_graphdef: `llm.split_layers()[0]`. The same operations as the
  reference, layer after layer; the cache's layer slices are updated in place."""
  h = jnp.take(weights.embedding, token, axis=0).astype(f32)      # [B, D], as embed()
  conv, ssm = cache
  for i, layer in enumerate(weights.layers):
    h, conv_i, ssm_i = block_step(block_graphdef, layer, h, conv[i], ssm[i])
    conv = jax.lax.dynamic_update_index_in_dim(conv, conv_i, i, 0)
    ssm = jax.lax.dynamic_update_index_in_dim(ssm, ssm_i, i, 0)
  return _head(config, weights, h), LayerStates(conv=conv, ssm=ssm)


def _head(config: Mamba2Config, weights: DecodeWeights, h: Array) -> Array:
  """Mamba2LM.head: final norm (f32), then the projection in the compute dtype."""
  x = (rms_normalize(h, config.norm_eps) * weights.final_norm.astype(f32)
       ).astype(config.compute_dtype)
  if config.tie_embeddings:
    return jnp.einsum("...d,vd->...v", x, weights.head, preferred_element_type=f32)
  return jnp.einsum("...d,dv->...v", x, weights.head, preferred_element_type=f32)


def padded_decode_weights(llm: Mamba2LM, multiple: int = 256) -> DecodeWeights:
  """`decode_weights` laid out for `kernels.decode.gemv`: every in_proj kernel [D, N] padded
  with zero columns to the next multiple of `multiple` above N (what gemv.in_proj splits
  over its programs; at least one padding column, where gemv.in_proj_reduce puts the sum
  of squares) and stored transposed, [Np, D]; every out_proj kernel stored transposed,
  [D, E] (each program of the gemv kernels reads whole rows of the contraction)."""
  weights = decode_weights(llm, transposed=True)
  width = llm.config.d_in_proj
  pad = multiple - width % multiple   # at least one zero row (matmul="reduce" uses it)

  def layer(state: nnx.State) -> nnx.State:
    def widen(path, a):
      if "in_proj" in jax.tree_util.keystr(path):
        return jnp.pad(a, ((0, pad), (0, 0)))                     # [N, D] -> [Np, D]
      return a
    return jax.tree_util.tree_map_with_path(widen, state)

  return weights._replace(layers=tuple(layer(s) for s in weights.layers))


def fused_decode_step(config: Mamba2Config, weights: DecodeWeights, token: Array,
                      cache: LayerStates, impl: str = "auto", matmul: str = "xla",
                      transposed: bool = False) -> tuple[Array, LayerStates]:
  """`decode_step` with the middle of every layer (conv, dt, SSM update and readout, gating)
  as one `kernels.decode.mixer_step` call (a Pallas kernel on GPU, impl="auto") and both
  RMS norms folded around the matmuls, so that no normalised copy of an activation is made:

    in_proj(rmsnorm(h) * w)    = (1/rms(h)) * ((h * w) @ W_in)      the scale applied inside
                                                                    the kernel
    out_proj(gatednorm(y, z))  = (1/rms(g)) * ((g * w') @ W_out)    for one group (G = 1);
                                                                    per group before W_out
                                                                    otherwise
  The same function as `decode_step` up to rounding: h * w and g * w' are rounded to the
  compute dtype before their matmul instead of the normalised values (tests/infer/
  test_fused_decode.py bounds the difference). token int32 [B] -> (logits [B, V] f32, cache).
  transposed: the weights are `decode_weights(llm, transposed=True)` (matmul="xla").

  matmul="pallas": the matmuls too are Pallas kernels with the norms inside
  (`kernels.decode.gemv`: rmsnorm + in_proj; gated norm + out_proj + residual), three kernels
  and a conv-state update a layer, the norms computed as `decode_step` does; needs
  `padded_decode_weights` (the matrices transposed) and B <= 16 (batches of more than
  gemv.VEC_ROWS rows are padded to 16 rows once per token, smaller ones are not).

  matmul="reduce": both norms folded as in "xla" (the same function up to the f32
  summation order), in_proj as XLA's multiply-and-reduce of the transposed matrix
  (`gemv.in_proj_reduce`, faster than the Pallas GEMV at one row on an H100; h * w rounded
  to cd before the matmul, the same reduction puts sum(h^2) in the first padding column,
  from which the mixer kernel applies 1/rms(h)) and out_proj as a Pallas kernel on the
  mixer's yw that applies the gated norm's 1/rms after the matmul and also writes the next
  layer's h * w (`gemv.out_proj_folded`): three kernels a layer.
  Both update the conv states in place: each mixer kernel writes its layer's x taps and the
  previous layer's B/C taps (`mixer_step(conv_in_place=True)`), one small update a token
  writes the last layer's.
  """
  if matmul in ("pallas", "reduce"):
    return _pallas_matmul_step(config, weights, token, cache, reduce_in=matmul == "reduce")
  if matmul != "xla":
    raise ValueError(f"fused_decode_step: matmul must be 'xla', 'pallas' or 'reduce', got "
                     f"{matmul!r}")
  c = config
  cd, eps = c.compute_dtype, c.norm_eps
  dims = mixer_kernels.dims_of(c)
  group = c.d_inner // c.n_groups
  h = jnp.take(weights.embedding, token, axis=0).astype(f32)      # [B, D]
  conv, ssm = cache
  for i, layer in enumerate(weights.layers):
    mixer = layer["mixer"]
    in_scale = jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1) + eps)          # [B]
    u = (h * layer["norm"]["weight"][...].astype(f32)).astype(cd)
    raw = jnp.einsum("bd,kd->bk" if transposed else "bd,dk->bk", u,
                     mixer["in_proj"]["kernel"][...], preferred_element_type=f32)  # [B, N]
    params = mixer_kernels.MixerParams(
        mixer["conv_weight"][...], mixer["conv_bias"][...], mixer["dt_bias"][...],
        mixer["A_log"][...], mixer["D"][...], mixer["norm"]["weight"][...])
    yw, ss, conv_i, ssm = mixer_kernels.mixer_step(jnp.int32(i), raw, in_scale, params, conv,
                                                   ssm, dims=dims, impl=impl)
    conv = jax.lax.dynamic_update_index_in_dim(conv, conv_i, i, 0)
    ss = ss.reshape(ss.shape[0], c.n_groups, -1).sum(-1)                      # [B, G]
    out_scale = jax.lax.rsqrt(ss / group + eps)                               # [B, G]
    w_out = mixer["out_proj"]["kernel"][...]        # [E, D], or [D, E] if transposed
    spec = "be,de->bd" if transposed else "be,ed->bd"
    if c.n_groups == 1:
      out = jnp.einsum(spec, yw, w_out, preferred_element_type=f32) * out_scale
    else:
      scaled = (yw.astype(f32).reshape(yw.shape[0], c.n_groups, group)
                * out_scale[:, :, None]).reshape(yw.shape).astype(cd)
      out = jnp.einsum(spec, scaled, w_out, preferred_element_type=f32)
    h = h + out.astype(cd).astype(f32)                            # Linear's output dtype
  return _head(c, weights, h), LayerStates(conv=conv, ssm=ssm)


def _pallas_matmul_step(config: Mamba2Config, weights: DecodeWeights, token: Array,
                       cache: LayerStates, reduce_in: bool = False
                       ) -> tuple[Array, LayerStates]:
  """fused_decode_step(matmul="pallas" | "reduce" (reduce_in)): see there."""
  from ma2mba_jax.kernels.decode import gemv
  c = config
  batch = token.shape[0]
  if batch > gemv.ROWS:
    raise ValueError(f"fused_decode_step(matmul='pallas') decodes at most {gemv.ROWS} rows, "
                     f"got a batch of {batch}")
  rows = gemv.padded_rows(batch)                                   # R
  interpret = jax.default_backend() != "gpu"
  dims = mixer_kernels.dims_of(c)
  h = jnp.take(weights.embedding, token, axis=0).astype(f32)      # [B, D]
  h = jnp.pad(h, ((0, rows - batch), (0, 0)))                      # [R, D], rows >= B zero
  scale, in_norm = jnp.ones((batch,), f32), None
  norm_w = [layer["norm"]["weight"][...] for layer in weights.layers]
  if reduce_in:   # the first layer's h * w; later ones from the out_proj kernels
    u = gemv.round_to(h * norm_w[0].astype(f32), c.compute_dtype).astype(c.compute_dtype)
    in_norm = (c.d_model, c.norm_eps)
  conv, ssm = cache
  bc = None   # the previous layer's new B/C conv taps, written by the next mixer kernel
  for i, layer in enumerate(weights.layers):
    mixer = layer["mixer"]
    if reduce_in:   # column N of the padded output: h's sum of squares
      zx = gemv.in_proj_reduce(u, h, mixer["in_proj"]["kernel"][...],
                               c.d_in_proj)                                   # [R, Np] f32
    else:
      zx = gemv.in_proj(h, norm_w[i], mixer["in_proj"]["kernel"][...], eps=c.norm_eps,
                        interpret=interpret)                                   # [R, Np] cd
    params = mixer_kernels.MixerParams(
        mixer["conv_weight"][...], mixer["conv_bias"][...], mixer["dt_bias"][...],
        mixer["A_log"][...], mixer["D"][...], mixer["norm"]["weight"][...])
    w_out = mixer["out_proj"]["kernel"][...]                        # [D, E]
    gated, ss, conv, ssm, bc = mixer_kernels.mixer_step(
        jnp.int32(i), zx, scale, params, conv, ssm, dims=dims, impl="pallas",
        interpret=interpret, gated_rows=None if reduce_in else rows, in_norm=in_norm,
        conv_in_place=True, bc_prev=bc, prefetch=w_out if reduce_in else None)
    if reduce_in:   # gated: yw = g * w in cd [B, E]; the gated norm's 1/rms after W
      pad = ((0, rows - batch), (0, 0))
      nxt = norm_w[i + 1] if i + 1 < len(weights.layers) else weights.final_norm
      h, u = gemv.out_proj_folded(jnp.pad(gated, pad), jnp.pad(ss, pad), w_out, h, nxt,
                                  eps=c.norm_eps, n_groups=c.n_groups, rows=batch,
                                  interpret=interpret)                # [R, D] f32, cd
    else:
      h = gemv.out_proj(gated, ss, mixer["norm"]["weight"][...], w_out, h, eps=c.norm_eps,
                        n_groups=c.n_groups, rows=batch, interpret=interpret)  # [R, D] f32
  conv = mixer_kernels.write_bc(conv, len(weights.layers) - 1, bc, dims)
  return _head(c, weights, h[:batch]), LayerStates(conv=conv, ssm=ssm)


def apply_layers(block_graphdef: nnx.GraphDef, weights: DecodeWeights, h: Array,
                 states: LayerStates) -> tuple[Array, LayerStates]:
  """`Mamba2LM.apply_layers` (sequence mode, no reset) on `decode_weights`: h [B, T, D] f32
  through every layer, the loop unrolled -> (h, final states)."""
  conv, ssm = states
  for i, layer in enumerate(weights.layers):
    h, conv_i, ssm_i = block_apply(block_graphdef, layer, h, conv[i], ssm[i])
    conv = jax.lax.dynamic_update_index_in_dim(conv, conv_i, i, 0)
    ssm = jax.lax.dynamic_update_index_in_dim(ssm, ssm_i, i, 0)
  return h, LayerStates(conv=conv, ssm=ssm)
