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

and what the forward keeps of a cell's inputs may live in host memory instead of on the
device (`remat.offload`, through jax.checkpoint_policies' offload to pinned host memory):
  none      both kinds of checkpoint stay on the device
  sequence  the sequence checkpoints (each cell's input conv/ssm states) go to the host
  all       the layer checkpoints (each cell's input h) go too
The cell's inputs are tagged with checkpoint_name inside the checkpointed function, so the
copy the backward reads is the tagged one: it is moved to the host in the forward and back
to the device when the cell's backward recomputes. On CPU, device and host memory are one,
and XLA drops the moves (the numerics are the same either way).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from ma2mba_jax.remat.settings import RematSettings

# checkpoint_name tags of a cell's inputs (the two kinds of MA-GC checkpoint).
SEQUENCE_CHECKPOINT = "magc_sequence_checkpoint"
LAYER_CHECKPOINT = "magc_layer_checkpoint"
OFFLOAD_CHOICES = {"none": (), "sequence": (SEQUENCE_CHECKPOINT,),
                   "all": (SEQUENCE_CHECKPOINT, LAYER_CHECKPOINT)}
CELL_SAVES = ("nothing", "layers", "dots", "names")


def scan_layers(layer_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
                ssm: jax.Array, reset: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies the layers in order. params leaves [l, ...]; conv/ssm [l, ...]; h [B, S, D];
  reset [B, S] bool or None (packed segments; passed to every layer only when given)."""
  kwargs = {} if reset is None else {"reset": reset}

  def one_layer(h, layer):
    layer_params, conv_state, ssm_state = layer
    h, conv_state, ssm_state = layer_fn(layer_params, h, conv_state, ssm_state, **kwargs)
    return h, (conv_state, ssm_state)

  h, (conv, ssm) = jax.lax.scan(one_layer, h, (params, conv, ssm))
  return h, conv, ssm


def _cell_policy(remat_cfg: RematSettings):
  saves = remat_cfg.cell_saves
  if saves in ("nothing", "layers"):
    return jax.checkpoint_policies.nothing_saveable
  if saves == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if saves == "names":
    return jax.checkpoint_policies.save_only_these_names(*remat_cfg.save_names)
  raise ValueError(f"config.remat.cell_saves={saves!r} is not one of {', '.join(CELL_SAVES)}")


def offload_choice(remat_cfg: RematSettings) -> str:
  """`remat.offload`, checked against OFFLOAD_CHOICES."""
  offload = remat_cfg.offload
  if offload not in OFFLOAD_CHOICES:
    raise ValueError(f"config.remat.offload={offload!r} is not one of "
                     f"{', '.join(OFFLOAD_CHOICES)}")
  return offload


def offloaded_names(remat_cfg: RematSettings) -> tuple[str, ...]:
  """The checkpoint tags `remat.offload` sends to host memory."""
  return OFFLOAD_CHOICES[offload_choice(remat_cfg)]


def _with_offload(policy: Callable, names: tuple[str, ...]) -> Callable:
  """`policy`, except that values tagged with one of `names` are offloaded to the host."""
  offload = jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=names,
      offload_src="device", offload_dst="pinned_host")

  def combined(prim, *args, **params):
    if prim.name == "name" and params.get("name") in names:  # checkpoint_name's primitive
      return offload(prim, *args, **params)
    return policy(prim, *args, **params)
  return combined


def cell_layer_fn(layer_fn: Callable, remat_cfg: RematSettings) -> Callable:
  """The per-layer function a cell runs: checkpointed per layer with cell_saves=layers."""
  if remat_cfg.cell_saves == "layers":
    return jax.checkpoint(layer_fn, prevent_cse=False)
  return layer_fn


def cell_checkpoint(remat_cfg: RematSettings) -> Callable[[Callable], Callable]:
  """Returns a decorator that puts a cell function under jax.checkpoint with the policy.

  The cell function is fn(params, h, conv, ssm, reset) -> (h, conv, ssm) (reset [B, S]
  bool or None: not differentiable, never offloaded).
  """
  policy = _cell_policy(remat_cfg)
  names = offloaded_names(remat_cfg)
  if not names:
    return lambda fn: jax.checkpoint(fn, policy=policy, prevent_cse=False)
  policy = _with_offload(policy, names)

  def decorate(fn: Callable) -> Callable:
    def tagged(params, h, conv, ssm, reset=None):
      if LAYER_CHECKPOINT in names:
        h = checkpoint_name(h, LAYER_CHECKPOINT)
      conv = checkpoint_name(conv, SEQUENCE_CHECKPOINT)
      ssm = checkpoint_name(ssm, SEQUENCE_CHECKPOINT)
      return fn(params, h, conv, ssm, reset)
    return jax.checkpoint(tagged, policy=policy, prevent_cse=False)
  return decorate
