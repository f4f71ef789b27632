"""MA-GC over fused Mamba-2 blocks as one `jax.custom_vjp`: the grid of remat/magc.py with
a hand-written backward that keeps XLA from copying.

remat/magc.py builds the grid from two `lax.scan`s around a `jax.checkpoint`ed cell and
lets autodiff write the backward. At 2^19 tokens (2.7B, H100) XLA's plan of that backward
holds, beside the checkpoints (BENCHMARKS.md, "Where XLA's MA-GC plan exceeds the paper
model"): several group-sized f32 parameter-gradient buffers (the time scan's accumulator
and each block's fresh contribution: ~24 GiB), full-length f32 copies of the residual
stream and its cotangent between the layouts [B, T, D] and [n_blocks, B, s, D] (~19 GiB),
and per-group copies of the sequence checkpoints (~9 GiB). Here the loops are written out
so that none of them exists:

  forward   for each group g of l layers (a fori_loop), for each block j of s tokens:
              save the layers' input states (sequence checkpoints Sc/Sm [n_blocks, L, ...],
              written in place), run the l fused blocks on h[:, j*s:(j+1)*s] and write the
              result back into h in place. Before group g >= 1, h is saved (layer
              checkpoints Hs [G-1, B, T, D]; group 0's input is the primal h itself).
  backward  groups last to first, blocks last to first: slice the block's group input
            from Hs (or h) and its input states from Sc/Sm (one block, no group copy),
            replay the cell's forward keeping each layer's input h (and with
            cell_saves=nothing its in_proj output), then layer by layer the fused block's
            own backward (models/fused_block.py `_fused_bwd`), adding each layer's
            parameter gradient into ONE [L, ...] buffer in place and writing the block's
            input cotangent into dh in place (block j's dh is read by block j only).

What stays on the device (B batch, T tokens, D width, L layers, G = L/l groups):
  h and dh [B, T, D] f32 (the primal input and the cotangent, updated in place), layer
  checkpoints (G-1) x [B, T, D] f32, sequence checkpoints (T/s) x L x (conv state f32 + ssm
  state in the compute dtype), one cell's replay (l x [B, s, D] f32, plus l x [B, s, F]
  compute dtype with cell_saves=nothing), a compute-dtype copy of the in_proj and out_proj
  weights [L, ...] (cast once per pass: the 3 x L x T/s layer calls slice it instead of each
  casting its f32 weights), one layer's backward, and the parameter gradient (the output).

Applies (`applies`) to the fused block (`model.block_impl=fused`) with cell_saves nothing or
layers, no offload, l dividing L and s dividing T, outside a sequence mesh axis; every other
MA-GC setting runs remat/magc.py. The same loss and gradients as the plain layer stack:
tests/remat/test_magc_fused.py.

Letters as in models/mamba2.py: B batch, T time, D width, F in_proj width, C conv channels,
K conv kernel, H heads, P head dim, N state size, L layers, l layers per group, s block.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par
from ma2mba_jax.models import fused_block as fb
from ma2mba_jax.remat.settings import RematPolicy, RematSettings

Array = jax.Array
f32 = jnp.float32
# cell_saves this path implements: what a cell's replay keeps for its layers' backward.
CELL_SAVES = ("nothing", "layers")
# The SSM state checkpoints ([T/s, L, B, H, P, N]) in the compute dtype: half the bytes in
# bf16 (5.4 GB at 2^19 for the 2.7B with s = 8192), which pays for the compute-dtype copy of
# the matmul weights. The backward then replays each cell from the rounded state; the bf16
# gradient error this adds is measured by tests/remat/magc_fused_sweep.py (which flips this
# to compare) and bounded in test_magc_fused.py. In float32 nothing changes.
STATE_CHECKPOINTS_IN_COMPUTE_DTYPE = True


def applies(model_cfg: Any, remat_cfg: RematSettings, n_layers: int, seqlen: int) -> bool:
  """Whether `apply` runs this MA-GC setting (else remat/magc.py does)."""
  l, s = remat_cfg.l, remat_cfg.s
  return (remat_cfg.policy == RematPolicy.MAGC and model_cfg.block_impl == "fused"
          and remat_cfg.offload == "none" and remat_cfg.cell_saves in CELL_SAVES
          and isinstance(l, int) and isinstance(s, int) and l >= 1 and s >= 1
          and n_layers % l == 0 and seqlen % s == 0 and seq_par.current_axis() is None)


# --------------------------------------------------------------------------- indexing


def _compute_weights(config, P: fb.BlockParams) -> fb.BlockParams:
  """The stack with its matmul weights (in_proj, out_proj) in the compute dtype: one cast of
  [L, ...] per pass instead of one per layer call (2.7B bf16: +5.2 GB while it lives)."""
  cd = config.compute_dtype
  return P._replace(in_proj=P.in_proj.astype(cd), out_proj=P.out_proj.astype(cd))


def _state_checkpoint_dtype(config, dtype):
  return config.compute_dtype if STATE_CHECKPOINTS_IN_COMPUTE_DTYPE else dtype


def _layer(P: fb.BlockParams, k) -> fb.BlockParams:
  """Layer k's parameters from the stack (leaves [L, ...] -> [...])."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, k, 0, keepdims=False), P)


def _block(x: Array | None, j, s: int) -> Array | None:
  """Block j of s tokens: x [B, T, ...] -> [B, s, ...] (None stays None)."""
  return None if x is None else lax.dynamic_slice_in_dim(x, j * s, s, axis=1)


def _put_block(x: Array, xb: Array, j, s: int) -> Array:
  return lax.dynamic_update_slice_in_dim(x, xb, j * s, axis=1)


def _get(x: Array, k) -> Array:
  return lax.dynamic_index_in_dim(x, k, 0, keepdims=False)


def _set(x: Array, value: Array, k) -> Array:
  return lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), k, 0)


# --------------------------------------------------------------------------- forward


def _cell(config, P, k0, hb, conv, ssm, rb, l: int):
  """Layers k0..k0+l-1 over one block: hb [B, s, D]; conv/ssm [L, ...] updated in place."""
  def layer(i, carry):
    hb, conv, ssm = carry
    k = k0 + i
    (hb, c, m), _ = fb._forward(config, _layer(P, k), hb, _get(conv, k), _get(ssm, k), rb,
                                tag_all=False)
    return hb, _set(conv, c, k), _set(ssm, m, k)
  return lax.fori_loop(0, l, layer, (hb, conv, ssm))


def _grid_forward(config, l: int, s: int, P, h, conv, ssm, reset, *, keep: bool):
  """h [B, T, D] f32, conv [L, B, C, K-1], ssm [L, B, H, P, N] -> (h, conv, ssm), and with
  `keep` the checkpoints (Hs [G-1, B, T, D], Sc [n_blocks, L, ...], Sm [n_blocks, L, ...])."""
  n_layers, seqlen = conv.shape[0], h.shape[1]
  n_groups, n_blocks = n_layers // l, seqlen // s
  P = _compute_weights(config, P)
  Hs = jnp.zeros((n_groups - 1,) + h.shape, h.dtype) if keep else None
  Sc = jnp.zeros((n_blocks,) + conv.shape, conv.dtype) if keep else None
  Sm = (jnp.zeros((n_blocks,) + ssm.shape, _state_checkpoint_dtype(config, ssm.dtype))
        if keep else None)

  def group(g, carry):
    h, conv, ssm, Sc, Sm = carry
    k0 = g * l

    def block(j, carry):
      h, conv, ssm, Sc, Sm = carry
      if keep:  # the group's input states at block j: [1, l, ...] into [n_blocks, L, ...]
        start = lambda x: (j, k0) + (0,) * (x.ndim - 1)
        Sc = lax.dynamic_update_slice(Sc, lax.dynamic_slice_in_dim(conv, k0, l)[None],
                                      start(conv))
        Sm = lax.dynamic_update_slice(
            Sm, lax.dynamic_slice_in_dim(ssm, k0, l).astype(Sm.dtype)[None], start(ssm))
      hb, conv, ssm = _cell(config, P, k0, _block(h, j, s), conv, ssm, _block(reset, j, s), l)
      return _put_block(h, hb, j, s), conv, ssm, Sc, Sm
    return lax.fori_loop(0, n_blocks, block, (h, conv, ssm, Sc, Sm))

  carry = group(0, (h, conv, ssm, Sc, Sm))
  if n_groups > 1:
    def saved_group(g, carry):
      h, conv, ssm, Sc, Sm, Hs = carry
      Hs = _set(Hs, h, g - 1) if keep else Hs
      return group(g, (h, conv, ssm, Sc, Sm)) + (Hs,)
    *carry, Hs = lax.fori_loop(1, n_groups, saved_group, (*carry, Hs))
  h, conv, ssm, Sc, Sm = carry
  return (h, conv, ssm), (Hs, Sc, Sm)


# --------------------------------------------------------------------------- the custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _magc(config, l: int, s: int, cell_saves: str, P, h, conv, ssm, reset):
  return _grid_forward(config, l, s, P, h, conv, ssm, reset, keep=False)[0]


def _magc_fwd(config, l, s, cell_saves, P, h, conv, ssm, reset):
  outs, (Hs, Sc, Sm) = _grid_forward(config, l, s, P, h, conv, ssm, reset, keep=True)
  return outs, (P, h, Hs, Sc, Sm, reset)


def _replay(config, P, k0, hb, conv_in, ssm_in, rb, l: int, keep_in_proj: bool):
  """The cell's forward again from its checkpoints, keeping each layer's input:
  -> hs [l, B, s, D] f32 and (keep_in_proj) zxbcdts [l, B, s, F] (else None).

  The last layer's output is not needed: of it only the in_proj output is computed
  (keep_in_proj), or nothing."""
  hs = jnp.zeros((l,) + hb.shape, hb.dtype)
  zxs = (jnp.zeros((l,) + hb.shape[:-1] + (config.d_in_proj,), config.compute_dtype)
         if keep_in_proj else None)

  def layer(i, carry):
    hb, hs, zxs = carry
    (h_next, _, _), zx = fb._forward(config, _layer(P, k0 + i), hb, _get(conv_in, i),
                                     _get(ssm_in, i).astype(f32), rb, tag_all=False)
    return h_next, _set(hs, hb, i), (_set(zxs, zx, i) if keep_in_proj else None)
  hb, hs, zxs = lax.fori_loop(0, l - 1, layer, (hb, hs, zxs))
  hs = _set(hs, hb, l - 1)
  if keep_in_proj:
    zxs = _set(zxs, _in_proj(config, _layer(P, k0 + l - 1), hb), l - 1)
  return hs, zxs


def _in_proj(config, p: fb.BlockParams, h: Array) -> Array:
  """The layer's in_proj output zxbcdt [B, s, F] from its input h [B, s, D], as the forward
  computes it."""
  cd = config.compute_dtype
  return fb._linear(fb._norm_in(h, p.norm, config.norm_eps, cd), p.in_proj, cd)


def _magc_bwd(config, l, s, cell_saves, residuals, cotangents):
  P, h_in, Hs, Sc, Sm, reset = residuals
  dh, dconv, dssm = cotangents               # [B, T, D]; [L, ...] (d final states)
  n_layers, seqlen = Sc.shape[1], h_in.shape[1]
  n_groups, n_blocks = n_layers // l, seqlen // s
  keep_in_proj = cell_saves == "nothing"
  grads = jax.tree.map(jnp.zeros_like, P)    # ONE [L, ...] buffer, added into in place
  P = _compute_weights(config, P)            # what the layers read (their matmul weights in cd)
  dh = dh.astype(f32)

  def group_input(g, j):  # block j of group g's input h: [B, s, D]
    first = _block(h_in, j, s)
    if Hs is None or Hs.shape[0] == 0:
      return first
    batch, _, width = h_in.shape
    later = lax.dynamic_slice(Hs, (jnp.maximum(g - 1, 0), 0, j * s, 0),
                              (1, batch, s, width))[0]
    return jnp.where(g == 0, first, later)

  def group(gg, carry):
    g = n_groups - 1 - gg
    k0 = g * l

    def block(jj, carry):
      dh, dconv, dssm, grads = carry
      j = n_blocks - 1 - jj
      rb = _block(reset, j, s)
      conv_in = lax.dynamic_slice_in_dim(_get(Sc, j), k0, l)        # [l, B, C, K-1]
      ssm_in = lax.dynamic_slice_in_dim(_get(Sm, j), k0, l)         # [l, B, H, P, N]
      hs, zxs = _replay(config, P, k0, group_input(g, j), conv_in, ssm_in, rb, l,
                        keep_in_proj)

      def layer(ii, carry):
        dhb, dconv, dssm, grads = carry
        i = l - 1 - ii
        k = k0 + i
        p = _layer(P, k)
        hb = _get(hs, i)
        zx = _get(zxs, i) if keep_in_proj else _in_proj(config, p, hb)
        dp, dhb, dc, dm, _ = fb._fused_bwd(
            config, (p, hb, zx, _get(conv_in, i), _get(ssm_in, i).astype(f32), rb),
            (dhb, _get(dconv, k), _get(dssm, k)))
        grads = jax.tree.map(lambda G, d: _set(G, _get(G, k) + d.astype(G.dtype), k),
                             grads, dp)
        return dhb, _set(dconv, dc, k), _set(dssm, dm, k), grads

      dhb, dconv, dssm, grads = lax.fori_loop(0, l, layer,
                                              (_block(dh, j, s), dconv, dssm, grads))
      return _put_block(dh, dhb, j, s), dconv, dssm, grads
    return lax.fori_loop(0, n_blocks, block, carry)

  dh, dconv, dssm, grads = lax.fori_loop(0, n_groups, group, (dh, dconv, dssm, grads))
  return grads, dh, dconv, dssm, None


_magc.defvjp(_magc_fwd, _magc_bwd)


def apply(model_cfg: Any, P: fb.BlockParams, h: Array, conv: Array, ssm: Array,
          remat_cfg: RematSettings, reset: Array | None = None) -> tuple[Array, Array, Array]:
  """The MA-GC grid over the stacked fused blocks (see `applies` for when it may run).

  Args:
    P: every layer's parameters, leaves [L, ...] (`fused_block.block_params` of the stack).
    h: [B, T, D]; conv [L, B, C, K-1]; ssm [L, B, H, P, N] (cast to f32 here).
    remat_cfg: resolved l (dividing L) and s (dividing T), cell_saves nothing | layers.
    reset: [B, T] bool (or int, nonzero = True) or None: packed segments; no cotangent.

  Returns:
    (h [B, T, D] f32, conv [L, ...] f32, ssm [L, ...] f32): every layer's final states.
  """
  n_layers, seqlen = conv.shape[0], h.shape[1]
  if not applies(model_cfg, remat_cfg, n_layers, seqlen):
    raise ValueError(f"magc_fused.apply: MA-GC l={remat_cfg.l!r} s={remat_cfg.s!r} "
                     f"cell_saves={remat_cfg.cell_saves!r} offload={remat_cfg.offload!r} "
                     f"block_impl={model_cfg.block_impl!r} with L={n_layers}, T={seqlen} is "
                     f"not this path's (needs fused blocks, cell_saves in {CELL_SAVES}, no "
                     f"offload, l | L, s | T, no sequence axis): use remat/magc.py")
  if reset is not None:
    reset = jnp.asarray(reset)
    reset = reset if reset.dtype == jnp.bool_ else reset != 0
  return _magc(model_cfg, remat_cfg.l, remat_cfg.s, remat_cfg.cell_saves, P,
               h.astype(f32), conv.astype(f32), ssm.astype(f32), reset)
