"""Sequence parallel training: each row's tokens split over the mesh's `seq` axis.

The step (train/step.py) runs the loss of every micro-batch inside ONE shard_map over all
mesh axes (data, fsdp, seq). Each device holds a piece [b, T/n] of its rows' tokens (and
F/n of their frames) and runs the whole model on it:

  * vision: each device encodes its own frames (the encoder and projector are per frame);
    the vision tokens then travel round the `seq` ring (n-1 ppermutes of one device's
    [b, F/n*K, C]) and every device takes those its tokens point at. No device ever holds
    all F*K vision tokens.
  * LM: inside `kernels.ssd.sequence_parallel.sequence_axis`, each layer's conv takes its
    K-1-token halo from the previous piece and the SSD passes states between pieces (only
    [b, H, P, N] per device per layer); none/layer/sqrt remat and MA-GC with one time
    block per piece run unchanged on the piece.
  * loss: targets and weights are computed before the shard_map on the whole rows (the
    target of a piece's last token is the next piece's first), and the sums are psummed.

Parameters enter in their FSDP/ZeRO-1 layout: those split over `fsdp` are all-gathered in
the loss function, so their gradients come back reduce-scattered (the all_gather's
transpose); all gradients are then summed over the other axes. Replicated over `seq`.

MA-GC with time blocks shorter than a piece needs, for each layer, the states leaving the
previous piece before its blocks run: its layer groups then run as a wavefront over the
`seq` devices (remat/pipeline.py), each device on its own piece's time blocks.

Letters: A micro-batches, b rows per device, T tokens, t = T/n per piece, F frames, K vision
tokens per frame, C LM width.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ma2mba_jax.data.batch import Batch
from ma2mba_jax.train import sharding
from ma2mba_jax.train.sharding import BATCH_AXES, SEQ_AXIS


def embed_pieces(model: Any, tokens: jax.Array, vision_index: jax.Array, frames: jax.Array,
                 frame_mask: jax.Array, n: int, axis: str = SEQ_AXIS) -> jax.Array:
  """`VideoMa2mba.embed_inputs` on this device's pieces (inside the shard_map).

  tokens, vision_index [b, t] (this piece; vision_index indexes the row's F*K vision
  tokens), frames [b, F/n, S, S, 3] and frame_mask [b, F/n] (this device's share of the
  row's frames, in order) -> embeddings [b, t, C] f32.
  """
  is_vision = vision_index >= 0
  h = model.llm.embed(jnp.where(is_vision, 0, tokens))                 # [b, t, C]
  vis = model.encode_frames(frames, frame_mask)                        # [b, F/n*K, C]
  piece = vis.shape[1]
  if piece == 0:
    return h
  me = jax.lax.axis_index(axis)
  ring = [(i, (i + 1) % n) for i in range(n)]
  for hop in range(n):  # after `hop` ppermutes this device holds device (me - hop)'s tokens
    start = ((me - hop) % n) * piece
    local = vision_index - start
    hit = is_vision & (local >= 0) & (local < piece)
    got = jnp.take_along_axis(vis, jnp.clip(local, 0, piece - 1)[..., None], axis=1)
    h = jnp.where(hit[..., None], got, h)
    if hop < n - 1:
      vis = jax.lax.ppermute(vis, axis, ring)
  return h


def pad_frames(micro: Batch, n: int) -> Batch:
  """micro-batches [A, b, F, ...] with F padded to a multiple of n (masked, black frames:
  encode_frames gives them zero tokens and skips their micro-batches)."""
  frames = micro.frames
  pad = -frames.shape[2] % n
  if not pad:
    return micro
  widths = lambda a: [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3)
  return micro.replace(frames=jnp.pad(frames, widths(frames)),
                       frame_mask=jnp.pad(micro.frame_mask, widths(micro.frame_mask)))


def param_specs(mesh: Mesh, tree: Any) -> Any:
  """The PartitionSpec of every parameter under the mesh (sharding.param_shardings)."""
  return jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, tree))


def _fsdp_axis(spec: P) -> int | None:
  for axis, name in enumerate(spec):
    if name is not None:
      return axis
  return None


def gather_params(tree: Any, specs: Any) -> Any:
  """Inside the shard_map: the whole parameters from this device's FSDP pieces."""
  def gather(a, spec):
    axis = _fsdp_axis(spec)
    return a if axis is None else jax.lax.all_gather(a, "fsdp", axis=axis, tiled=True)
  return jax.tree.map(gather, tree, specs)


def sum_grads(grads: Any, specs: Any) -> Any:
  """Inside the shard_map: gradients of this device's loss -> the global sum, in the
  parameters' layout (pieces split over `fsdp` were already reduce-scattered over it)."""
  def reduce(g, spec):
    axes = ("data", SEQ_AXIS) if _fsdp_axis(spec) is not None else sharding.MESH_AXES
    return jax.lax.psum(g, axes)
  return jax.tree.map(reduce, grads, specs)


def piece_spec(ndim: int) -> P:
  """Micro-batch arrays [A, rows, T or F, ...]: rows over the batch axes, T/F over seq."""
  return P(None, BATCH_AXES, SEQ_AXIS, *([None] * (ndim - 3)))


def over_pieces(mesh: Mesh, local: Callable, trainable: Any, frozen: Any,
                micro: Batch, out_specs: Any) -> Any:
  """local(trainable_pieces, frozen_pieces, micro_pieces, trainable_specs, frozen_specs)
  in a shard_map over every mesh axis; micro [A, rows, T or F, ...]."""
  t_specs, f_specs = param_specs(mesh, trainable), param_specs(mesh, frozen)
  m_specs = jax.tree.map(lambda v: piece_spec(v.ndim), micro)
  out_specs = out_specs(t_specs) if callable(out_specs) else out_specs
  fn = jax.shard_map(lambda t, f, m: local(t, f, m, t_specs, f_specs), mesh=mesh,
                     in_specs=(t_specs, f_specs, m_specs), out_specs=out_specs,
                     check_vma=False)
  return fn(trainable, frozen, micro)
