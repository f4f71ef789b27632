"""Remat policies over a stack of layers, chosen by name from `config.remat`.

Every policy computes the same function,

    apply(layer_fn, params, h, conv, ssm, remat_cfg) -> (h, conv, ssm)

    layer_fn(layer_params, h, conv_state, ssm_state) -> (h, conv_state, ssm_state)
    params: pytree, leaves [L, ...]     h: [B, S, D] f32
    conv: [L, B, conv_dim, K-1]         ssm: [L, B, H, P, N]
    reset: [B, S] bool or None (packed segments; layer_fn gets reset= only when given)

and differs only in what the forward keeps for the backward:

  none   everything (memory O(L*S))
  layer  each layer's input: each layer under jax.checkpoint (the usual GC)
  sqrt   each group of about sqrt(L) layers' input (O(sqrt(L)*S))
  magc   a grid of l layers x s tokens (multi-axis GC, see magc.py; O(S) at the optimum)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from ma2mba_jax.remat import magc
from ma2mba_jax.remat.cells import cell_checkpoint, scan_layers
from ma2mba_jax.remat.settings import RematPolicy, RematSettings

LayerFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def apply_none(layer_fn: LayerFn, params, h, conv, ssm, remat_cfg: RematSettings,
               reset=None) -> tuple:
  del remat_cfg
  return scan_layers(layer_fn, params, h, conv, ssm, reset)


def apply_layer(layer_fn: LayerFn, params, h, conv, ssm, remat_cfg: RematSettings,
                reset=None) -> tuple:
  return magc.apply_layer_groups(layer_fn, params, h, conv, ssm, group_size=1,
                                 checkpoint=cell_checkpoint(remat_cfg), reset=reset)


def sqrt_group_size(n_layers: int) -> int:
  return max(1, round(math.sqrt(n_layers)))


def apply_sqrt(layer_fn: LayerFn, params, h, conv, ssm, remat_cfg: RematSettings,
               reset=None) -> tuple:
  n_layers = jax.tree.leaves(params)[0].shape[0]
  return magc.apply_layer_groups(layer_fn, params, h, conv, ssm,
                                 group_size=sqrt_group_size(n_layers),
                                 checkpoint=cell_checkpoint(remat_cfg), reset=reset)


POLICIES: dict[RematPolicy, Callable[..., tuple]] = {
    RematPolicy.NONE: apply_none,
    RematPolicy.LAYER: apply_layer,
    RematPolicy.SQRT: apply_sqrt,
    RematPolicy.MAGC: magc.apply_magc,
}


def apply_with_remat(layer_fn: LayerFn, params: Any, h: jax.Array, conv: jax.Array,
                     ssm: jax.Array, remat_cfg: RematSettings,
                     reset: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the layer stack under the policy named by `remat_cfg.policy`.

  reset: [B, S] bool or None: True where a packed segment starts (see block_apply).
  """
  policy = remat_cfg.policy
  if policy not in POLICIES:
    raise ValueError(f"config.remat.policy={policy!r} is not one of "
                     f"{sorted(p.value for p in POLICIES)}")
  if reset is None:  # today's call, exactly
    return POLICIES[policy](layer_fn, params, h, conv, ssm, remat_cfg)
  return POLICIES[policy](layer_fn, params, h, conv, ssm, remat_cfg, reset=reset)
