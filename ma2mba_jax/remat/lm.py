"""The Mamba-2 layer stack under a remat policy: what training calls instead of
`Mamba2LM.apply_layers` (which keeps every activation)."""

from __future__ import annotations

import functools

import jax

from ma2mba_jax.models.fused_block import block_params
from ma2mba_jax.models.mamba2 import LayerStates, Mamba2LM, block_apply
from ma2mba_jax.remat import magc_fused
from ma2mba_jax.remat.policies import apply_with_remat
from ma2mba_jax.remat.settings import RematSettings


def apply_layers_with_remat(llm: Mamba2LM, h: jax.Array, remat_cfg: RematSettings,
                            states: LayerStates | None = None,
                            reset: jax.Array | None = None) -> tuple[jax.Array, LayerStates]:
  """h [B, T, D] f32 through every layer under `remat_cfg` -> (h, final LayerStates).

  remat_cfg: resolved settings (ints l and s for magc: see remat.magc.resolve). MA-GC over
  fused blocks runs remat/magc_fused.py (one hand-written backward) where it applies, else
  remat/policies.py.
  reset: [B, T] bool or None, True where a packed segment starts.
  """
  if states is None:
    states = llm.init_states(h.shape[0])
  if magc_fused.applies(llm.config, remat_cfg, llm.config.n_layers, h.shape[1]):
    h, conv, ssm = magc_fused.apply(llm.config, block_params(llm.layers), h, states.conv,
                                    states.ssm, remat_cfg, reset)
    return h, LayerStates(conv=conv, ssm=ssm)
  graphdef, stacked = llm.split_layers()
  layer_fn = functools.partial(block_apply, graphdef)
  h, conv, ssm = apply_with_remat(layer_fn, stacked, h, states.conv, states.ssm, remat_cfg,
                                  reset)
  return h, LayerStates(conv=conv, ssm=ssm)
