"""Multi-Axis Gradient Checkpointing (MA-GC): a grid of l layers x s tokens.

    for each group of l layers (lax.scan; carry = h of every token):
      for each time block of s tokens (lax.scan; carry = the group's states):
        cell = jax.checkpoint(l layers over s tokens)

What the forward keeps, by construction of the two scans around a checkpointed cell:
  * layer checkpoints: each cell's input h [B, s, D], for every group and block
    (L/l * S * D in all);
  * sequence checkpoints: each cell's input states (conv [l, B, conv_dim, K-1] and
    ssm [l, B, H, P, N]), i.e. every layer's states at every block boundary (L * S/s of them).
The backward runs groups top to bottom and blocks last to first; each cell recomputes its
forward from those two checkpoints and back-propagates, sending dh to the group below and
d(states) to the previous block -- the SSD and conv1d take initial states as inputs and
return their gradients, which is what makes this exact.

T not a multiple of s and L not a multiple of l are handled by a last, shorter block and a
last, smaller group.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par
from ma2mba_jax.remat.cells import (LAYER_CHECKPOINT, SEQUENCE_CHECKPOINT, cell_checkpoint,
                                    cell_layer_fn, offload_choice, offloaded_names,
                                    scan_layers)
from ma2mba_jax.remat.pipeline import (PIPELINE_LAYER, PIPELINE_SEQUENCE,
                                       apply_magc_pipeline)
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory, plan_magc
from ma2mba_jax.remat.settings import RematSettings


def _leading(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _over_layer_groups(group_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
                       ssm: jax.Array, group_size: int) -> tuple:
  """group_fn(group params, h, conv, ssm) -> (h, conv, ssm) over consecutive groups of
  `group_size` layers: a scan over the full groups, then the rest as one shorter group.
  Returns h and every layer's final conv / ssm states ([L, ...])."""
  n_layers = _leading(params)
  n_full, n_rest = divmod(n_layers, group_size)
  convs, ssms = [], []
  if n_full:
    def grouped(a):  # [L, ...] -> [n_full, group_size, ...]; free when group_size divides L
      a = a if n_rest == 0 else a[:n_full * group_size]
      return a.reshape((n_full, group_size) + a.shape[1:])

    def group_step(h, group):
      group_params, group_conv, group_ssm = group
      h, group_conv, group_ssm = group_fn(group_params, h, group_conv, group_ssm)
      return h, (group_conv, group_ssm)

    h, (c, m) = jax.lax.scan(group_step, h, jax.tree.map(grouped, (params, conv, ssm)))
    convs.append(c.reshape((-1,) + c.shape[2:]))
    ssms.append(m.reshape((-1,) + m.shape[2:]))
  if n_rest:
    rest = lambda a: a[n_full * group_size:]
    h, c, m = group_fn(jax.tree.map(rest, params), h, rest(conv), rest(ssm))
    convs.append(c)
    ssms.append(m)
  return h, _concat(convs, axis=0), _concat(ssms, axis=0)


def apply_layer_groups(layer_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
                       ssm: jax.Array, *, group_size: int,
                       checkpoint: Callable[[Callable], Callable],
                       reset: jax.Array | None = None) -> tuple:
  """Layers in groups of `group_size`, each group a checkpointed cell, scanned in order.

  params leaves [L, ...]; h [B, S, D]; conv [L, B, conv_dim, K-1]; ssm [L, B, H, P, N];
  reset [B, S] bool or None (packed segments).
  """
  cell = checkpoint(lambda p, h, c, s, r: scan_layers(layer_fn, p, h, c, s, r))
  return _over_layer_groups(lambda p, h, c, m: cell(p, h, c, m, reset), params, h, conv, ssm,
                            group_size)


def _group_over_time(cell: Callable, group_params: Any, h: jax.Array, conv: jax.Array,
                     ssm: jax.Array, s: int, reset: jax.Array | None = None,
                     tag: bool = False) -> tuple:
  """One group of layers over every token, one time block (cell) after another.

  The scan's carry is the group's states: what it keeps for the backward at each block
  boundary are the sequence checkpoints; its xs are the layer checkpoints (h [B, s, D])
  and, with packed segments, the block's slice of reset [B, s].
  tag: name each cell's inputs (pipeline.PIPELINE_LAYER / PIPELINE_SEQUENCE) for a
  checkpoint around the whole group that saves only them (remat/pipeline.py).
  """
  def tagged_cell(p, h_blk, c, m, r):
    if tag:
      h_blk = checkpoint_name(h_blk, PIPELINE_LAYER)
      c = checkpoint_name(c, PIPELINE_SEQUENCE)
      m = checkpoint_name(m, PIPELINE_SEQUENCE)
    return cell(p, h_blk, c, m, r)

  batch, seqlen, width = h.shape
  n_blocks, n_rest = divmod(seqlen, s)
  outputs = []
  if n_blocks:
    def block_step(states, xs):
      h_blk, reset_blk = xs
      h_blk, c, m = tagged_cell(group_params, h_blk, *states, reset_blk)
      return (c, m), h_blk

    blocks = jnp.moveaxis(h[:, :n_blocks * s].reshape(batch, n_blocks, s, width), 1, 0)
    reset_blocks = None if reset is None else jnp.moveaxis(
        reset[:, :n_blocks * s].reshape(batch, n_blocks, s), 1, 0)  # [n_blocks, B, s]
    (conv, ssm), h_out = jax.lax.scan(block_step, (conv, ssm), (blocks, reset_blocks))
    outputs.append(jnp.moveaxis(h_out, 0, 1).reshape(batch, n_blocks * s, width))
  if n_rest:
    reset_rest = None if reset is None else reset[:, n_blocks * s:]
    h_rest, conv, ssm = tagged_cell(group_params, h[:, n_blocks * s:], conv, ssm, reset_rest)
    outputs.append(h_rest)
  return _concat(outputs, axis=1), conv, ssm


def _concat(parts: list[jax.Array], axis: int) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def apply_magc(layer_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
               ssm: jax.Array, remat_cfg: RematSettings, reset: jax.Array | None = None
               ) -> tuple:
  """The MA-GC grid. `remat_cfg.l` and `remat_cfg.s` must be resolved ints (see resolve).
  reset [B, S] bool or None (packed segments) is sliced per time block alongside h.

  Traversal: a scan over layer groups, inside it a scan over time blocks, each cell under
  jax.checkpoint. The grid and the checkpoints are the paper's; only the loop nesting is
  swapped (the backward still meets every cell after the cell above it and the cell after
  it in time). The reason is measured, not aesthetic: with time blocks outside, every time
  block's backward produces a gradient for *all* parameters, which XLA accumulates in
  parameter-sized loop buffers (for the 2.7B model at 16K tokens the compiled temp memory
  was 41.3 GB against 33.2 GB this way); with groups outside, a group's gradient is
  accumulated over its time blocks in a group-sized buffer and lands once in the output.

  Under a `seq` mesh axis (`sequence_axis`, h this device's piece [b, t, D]) with time
  blocks shorter than the piece, the groups run as a wavefront over the axis
  (remat/pipeline.py); with one block per piece every device runs each group at once, the
  SSD and conv stitching the pieces.
  """
  l, s = remat_cfg.l, remat_cfg.s
  if not (isinstance(l, int) and isinstance(s, int)) or l < 1 or s < 1:
    raise ValueError(f"MA-GC needs resolved positive ints for config.remat.l and .s, got "
                     f"l={l!r}, s={s!r} (resolve 'auto' with remat.magc.resolve first)")
  inner_fn = cell_layer_fn(layer_fn, remat_cfg)
  cell = cell_checkpoint(remat_cfg)(
      lambda p, h, c, m, r: scan_layers(inner_fn, p, h, c, m, r))
  group = lambda p, h, c, m: _group_over_time(cell, p, h, c, m, s, reset)
  if seq_par.current_axis() is not None and s < h.shape[1]:
    tagged = lambda p, h, c, m: _group_over_time(cell, p, h, c, m, s, reset, tag=True)
    return apply_magc_pipeline(tagged, params, h, conv, ssm, l,
                               offload=offloaded_names(remat_cfg))
  return _over_layer_groups(group, params, h, conv, ssm, l)


def resolve(remat_cfg: RematSettings, model_cfg: Any, seqlen: int, *,
            bytes_per_element: int = 2, budget_bytes: float | None = None,
            pipeline_devices: int = 1) -> tuple[int, int, float]:
  """Turns l/s = 'auto' into ints with the memory model; returns (l, s, predicted bytes).

  This is `remat.planner='model'`, the paper's Table 7 model, which misses what XLA keeps
  beside the checkpoints; `remat.planner='measure'` compiles candidates instead
  (remat/measure.py `plan`). The prediction is device memory: checkpoints that
  `remat_cfg.offload` keeps on the host are left out of it (and of the choice).

  Explicit ints are kept (and checked); `s` must be a multiple of the SSD chunk length.
  Under a `seq` mesh axis `seqlen` is one device's piece and `pipeline_devices` the axis
  size: time blocks shorter than the piece run as a wavefront (remat/pipeline.py), whose
  stacked checkpoints the model counts (remat/planner.py).
  """
  chunk = model_cfg.chunk_len
  constants = MemoryConstants.from_model(model_cfg)
  budget = None if budget_bytes is None else budget_bytes / bytes_per_element
  offload = offload_choice(remat_cfg)
  plan = plan_magc(model_cfg.n_layers, seqlen, constants, chunk_len=chunk,
                   budget_elements=budget, offload=offload,
                   pipeline_devices=pipeline_devices)
  l = plan.l if remat_cfg.l == "auto" else int(remat_cfg.l)
  s = plan.s if remat_cfg.s == "auto" else int(remat_cfg.s)
  if not 1 <= l <= model_cfg.n_layers:
    raise ValueError(f"config.remat.l={l} must be in 1..n_layers={model_cfg.n_layers}")
  if s < 1 or s % chunk:
    raise ValueError(f"config.remat.s={s} must be a positive multiple of the SSD chunk "
                     f"length {chunk}")
  predicted = magc_memory(model_cfg.n_layers, seqlen, l, s, constants, offload,
                          pipeline_devices)
  return l, s, predicted * bytes_per_element
