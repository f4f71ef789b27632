"""MA-GC with time blocks inside each device's piece of a sequence: a wavefront pipeline.

Under a `seq` mesh axis (train/sequence.py) device k of n holds tokens [k t, (k+1) t) of
every row. MA-GC's time blocks inside a piece need, for each layer, the states that leave
the previous piece, i.e. the previous device must have run that layer first. With the L
layers in G groups of l, the devices run as a wavefront:

    tick u = 0 .. G+n-2:  device k runs group g = u - k (when 0 <= g < G) over its own
                          piece, one time block (checkpointed cell) after another, from the
                          conv + SSM states of group g that device k-1 left at tick u-1
                          (ppermute; device 0 starts from the row's initial states), and
                          hands its final states to device k+1.

    ticks ->   0    1    2    3    4          (G = 4 groups, n = 2 devices)
    device 0   g0   g1   g2   g3   .
    device 1   .    g0   g1   g2   g3

The group is MA-GC's own (remat/magc.py `_group_over_time`: a scan over time blocks of
checkpointed cells taking initial states), run on one device's piece with the ordinary
one-device SSD and conv (the `sequence_axis` context is switched off while it is traced),
so the forward keeps per device MA-GC's grid on its piece: layer checkpoints h [b, s, D] and
sequence checkpoints (each cell's input states). The backward is autodiff of the tick scan:
it runs the ticks in reverse, each active device back-propagating its group over its time
blocks, and the transpose of the ppermute hands d(states) back to device k-1 one tick
earlier, which is exactly when that device back-propagates the same group.

Costs against MA-GC on one device with the same piece: a device is busy G of the G+n-1
ticks (the bubble: G/(G+n-1) of ideal, e.g. 8/9 with 8 groups over 2 devices), forward and
backward alike; the per-tick residuals are stacked over G+n-1 ticks (idle ticks keep zeros),
(G+n-1)/G of the grid's checkpoints; L not a multiple of l runs the last, smaller group as a
second wavefront (n-1 more idle ticks). Each tick's group runs under a checkpoint that saves
only its cells' inputs (the two kinds of MA-GC checkpoint, tagged), so the group's
parameter slice is taken again in the backward rather than kept for every tick (which cost
(G+n-1)/G of the layers' f32 weights per device before: 13.5 GB for the 3.1B model with
G=4 over 2 devices).

Letters: L layers, G groups, l layers a group, n devices on the axis, b rows, t tokens a
piece, s tokens a time block, D width.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par

# checkpoint_name tags of a cell's inputs inside the wavefront (remat/magc.py tags them
# when it runs a group here): the tick's checkpoint saves only these, and recomputes the
# group's parameter slice (and nothing else) in the backward.
PIPELINE_LAYER = "magc_pipeline_layer_checkpoint"
PIPELINE_SEQUENCE = "magc_pipeline_sequence_checkpoint"


def _tick_policy(offload: tuple[str, ...]) -> Callable:
  """Saves the tagged cell inputs (offloading to pinned host memory the kinds `offload`
  names: cells.SEQUENCE_CHECKPOINT, cells.LAYER_CHECKPOINT), nothing else."""
  from ma2mba_jax.remat import cells   # cells does not import this module; magc imports both
  kinds = {cells.LAYER_CHECKPOINT: PIPELINE_LAYER, cells.SEQUENCE_CHECKPOINT: PIPELINE_SEQUENCE}
  off = tuple(kinds[k] for k in offload)
  kept = tuple(n for n in (PIPELINE_LAYER, PIPELINE_SEQUENCE) if n not in off)
  if not off:
    return jax.checkpoint_policies.save_only_these_names(*kept)
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=kept, names_which_can_be_offloaded=off,
      offload_src="device", offload_dst="pinned_host")

def _leading(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _wavefront(group_fn: Callable, params: Any, group_size: int, h: jax.Array,
               conv: jax.Array, ssm: jax.Array, axis: str, n: int,
               offload: tuple[str, ...] = ()) -> tuple:
  """group_fn(group params, h, conv, ssm) -> (h, conv, ssm) for the G groups of
  `group_size` layers of `params` (leaves [G*l, ...]) as a wavefront over the n devices of
  `axis` (inside the shard_map).

  h [b, t, D] this device's piece; conv [G, l, b, C, K-1], ssm [G, l, b, H, P, N]: the row's
  initial states (device 0 starts from them). Returns h after the last group and the states
  leaving this device's piece, [G, l, ...] each.
  """
  n_groups = _leading(params) // group_size
  me = jax.lax.axis_index(axis)
  to_next = [(i, i + 1) for i in range(n - 1)]

  def group_at(params, h, conv_in, ssm_in, g):
    group_params = jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, g * group_size, group_size), params)
    return group_fn(group_params, h, conv_in, ssm_in)

  # The group under a checkpoint that saves only its cells' tagged inputs (MA-GC's layer
  # and sequence checkpoints): the parameter slice is taken again in the backward instead
  # of being saved at every tick ((G+n-1)/G of the layer weights). Under this policy the
  # cells' own policies are not consulted (an outer checkpoint's policy decides for what
  # it encloses), so it must name exactly what MA-GC keeps; cells are recomputed inside
  # their own backward as before.
  # The cond is inside the checkpoint: a checkpoint's inputs are among its residuals, and
  # `params` leaving a cond would count as changing from tick to tick (stacked over the
  # ticks); leaving the checkpoint directly it is loop-invariant and kept once.
  def idle(params, h, conv_in, ssm_in, g):
    del params, g
    return h, conv_in, ssm_in

  def maybe_group(params, h, conv_in, ssm_in, g, active):
    return jax.lax.cond(active, group_at, idle, params, h, conv_in, ssm_in, g)

  checkpointed = jax.checkpoint(maybe_group, policy=_tick_policy(offload), prevent_cse=False)

  def tick(carry, u):
    h, conv_out, ssm_out = carry                    # conv_out/ssm_out: this device's last
    conv_in = jax.lax.ppermute(conv_out, axis, to_next)   # device k-1's, from tick u-1
    ssm_in = jax.lax.ppermute(ssm_out, axis, to_next)
    g = u - me
    clipped = jnp.clip(g, 0, n_groups - 1)
    conv_in = jnp.where(me == 0, conv[clipped], conv_in)
    ssm_in = jnp.where(me == 0, ssm[clipped], ssm_in)
    # Collectives stay outside the cond: every device takes part in every ppermute.
    h, conv_out, ssm_out = checkpointed(params, h, conv_in, ssm_in, clipped,
                                        (g >= 0) & (g < n_groups))
    return (h, conv_out, ssm_out), (conv_out, ssm_out)

  # An earlier outer checkpoint saved everything but the slices: under it the cells' own
  # policies no longer held (their insides were saved), which ran a 3.1B step at 2^18
  # tokens out of 143 GB; the names-only policy above saves what MA-GC keeps and no more.
  carry = (h, jnp.zeros_like(conv[0]), jnp.zeros_like(ssm[0]))
  (h, _, _), (convs, ssms) = jax.lax.scan(tick, carry, jnp.arange(n_groups + n - 1))
  # This device finished group g at tick g + me: its states leaving the piece.
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, me, n_groups, axis=0)
  return h, take(convs), take(ssms)


def apply_magc_pipeline(group_fn: Callable, params: Any, h: jax.Array, conv: jax.Array,
                        ssm: jax.Array, group_size: int,
                        offload: tuple[str, ...] = ()) -> tuple:
  """MA-GC's layer groups as a wavefront over the enclosing `sequence_axis` (inside the
  shard_map that splits T over it; see the module docstring).

  group_fn(group params, h, conv, ssm) -> (h, conv, ssm): one group over this device's
  piece, one time block after another, from the given states, its cells' inputs tagged
  PIPELINE_LAYER / PIPELINE_SEQUENCE (the only values the forward keeps; offload: the
  kinds, cells.LAYER_CHECKPOINT / SEQUENCE_CHECKPOINT, kept in host memory). params leaves [L, ...];
  h [b, t, D]; conv [L, b, C, K-1], ssm [L, b, H, P, N] the row's initial states.
  Returns h and every layer's final states of the whole rows (the last piece's), on every
  device, as the layers do under the context.
  """
  context = seq_par.current_axis()
  if context is None:
    raise ValueError("apply_magc_pipeline runs inside sequence_axis (a seq mesh axis)")
  axis, n = context
  n_layers = _leading(params)
  n_full, n_rest = divmod(n_layers, group_size)
  parts = [(0, n_full * group_size, group_size)] if n_full else []
  if n_rest:
    parts.append((n_full * group_size, n_layers, n_rest))
  convs, ssms = [], []
  for start, stop, size in parts:
    def grouped(a):                 # [L, ...] -> [(stop-start) / size, size, ...]
      a = a[start:stop]
      return a.reshape((-1, size) + a.shape[1:])
    part = jax.tree.map(lambda a: a[start:stop], params)   # free when start:stop is all
    # The group runs on this piece alone: the one-device SSD and conv from given states.
    with seq_par.sequence_axis(axis, 1):
      h, c, m = _wavefront(group_fn, part, size, h, grouped(conv), grouped(ssm), axis, n,
                           offload)
    convs.append(c.reshape((-1,) + c.shape[2:]))
    ssms.append(m.reshape((-1,) + m.shape[2:]))
  conv_out = convs[0] if len(convs) == 1 else jnp.concatenate(convs, axis=0)
  ssm_out = ssms[0] if len(ssms) == 1 else jnp.concatenate(ssms, axis=0)
  return h, seq_par.last_piece_state(conv_out), seq_par.last_piece_state(ssm_out)
