"""Building blocks shared by the remat policies: a scan over layers, and checkpointed cells.

A *cell* is a run of consecutive layers over a run of consecutive tokens. Under
`jax.checkpoint` the forward keeps only a cell's inputs (its h, its layers' parameters and
states); what the cell keeps inside during its own backward is `remat.cell_saves`:
  nothing  recompute everything inside the cell
  layers   keep each layer's input only, and recompute each layer once more during the
           cell's backward: one layer's internals alive at a time instead of l layers'
           (costs a third forward; worth it when a layer's internals are large, as the
           xla SSD backend's [H, Q, Q] chunk matrices are)
  dots     keep matmul outputs (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  names    keep the activations the model tags with checkpoint_name (`remat.save_names`)
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def scan_layers(layer_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
                ssm: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies the layers in order. params leaves [l, ...]; conv/ssm [l, ...]; h [B, S, D]."""
  def one_layer(h, layer):
    layer_params, conv_state, ssm_state = layer
    h, conv_state, ssm_state = layer_fn(layer_params, h, conv_state, ssm_state)
    return h, (conv_state, ssm_state)

  h, (conv, ssm) = jax.lax.scan(one_layer, h, (params, conv, ssm))
  return h, conv, ssm


def _cell_policy(remat_cfg: Any):
  saves = getattr(remat_cfg, "cell_saves", "nothing")
  if saves in ("nothing", "layers"):
    return jax.checkpoint_policies.nothing_saveable
  if saves == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if saves == "names":
    return jax.checkpoint_policies.save_only_these_names(*tuple(remat_cfg.save_names))
  raise ValueError(f"config.remat.cell_saves={saves!r} is not one of nothing, layers, dots, "
                   f"names")


def cell_layer_fn(layer_fn: Callable, remat_cfg: Any) -> Callable:
  """The per-layer function a cell runs: checkpointed per layer with cell_saves=layers."""
  if getattr(remat_cfg, "cell_saves", "nothing") == "layers":
    return jax.checkpoint(layer_fn, prevent_cse=False)
  return layer_fn


def cell_checkpoint(remat_cfg: Any) -> Callable[[Callable], Callable]:
  """Returns a decorator that puts a cell function under jax.checkpoint with the policy."""
  policy = _cell_policy(remat_cfg)
  return lambda fn: jax.checkpoint(fn, policy=policy, prevent_cse=False)
