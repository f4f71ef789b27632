"""The pure training step: (state, batch) -> (state, metrics), jitted once.

The global batch arrives as [A * m, ...] rows (A micro-batches of m rows, m split over the
mesh's batch axes; with a `seq` axis each row's tokens split over it, train/sequence.py);
gradients are accumulated over the A micro-batches in a scan, then the optimizer updates
only the trainable parameter groups (frozen groups get no gradient). The loss is the
token-level mean cross-entropy over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from ma2mba_jax.data.batch import Batch, as_batch
from ma2mba_jax.kernels.ssd import reset_from_segment_ids
from ma2mba_jax.kernels.ssd.sequence_parallel import sequence_axis
from ma2mba_jax.remat.lm import apply_layers_with_remat
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train import sequence, sharding
from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets
from ma2mba_jax.train.sharding import BATCH_AXES, SEQ_AXIS


class TrainState(NamedTuple):
  step: jax.Array          # int32 []
  trainable: dict          # {group: params} being trained, pure dicts (f32 master weights)
  frozen: dict             # {group: params} of the frozen groups
  opt_state: Any
  rng: jax.Array           # typed PRNG key; per-step randomness is fold_in(rng, step)


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The whole model's params (a pure dict, which nnx.merge accepts)."""
  return {**trainable, **frozen}


def with_loss_targets(batch: Batch, packed: bool = False) -> Batch:
  """The batch with `targets` and `weights` [B, T] (and with `packed`, `reset` [B, T]).

  Position t is a target only if t + 1 is in the same segment: the loss never crosses a
  boundary. Computed on whole rows (under a `seq` axis, before they are split)."""
  segment_ids = batch.segment_ids                                    # [B, T] int32
  targets, weights = shift_targets(batch.tokens, batch.loss_mask)
  same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                          jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)  # [B, T]
  return batch.replace(
      targets=targets, weights=weights * ((segment_ids > 0) & same),
      reset=reset_from_segment_ids(segment_ids) if packed else batch.reset)  # [B, T] bool


def _sums_from_embeddings(model: Any, h: jax.Array, batch: Batch, remat_cfg: RematSettings,
                          loss_block_len: int) -> tuple[jax.Array, jax.Array]:
  h, _ = apply_layers_with_remat(model.llm, h, remat_cfg, reset=batch.reset)
  return blockwise_cross_entropy(h, model.llm.head, batch.targets, batch.weights,
                                 block_len=loss_block_len)


def loss_sums(model: Any, batch: Batch, remat_cfg: RematSettings,
              loss_block_len: int = 4096, packed: bool = False) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of target tokens) of one micro-batch.

  packed (static): rows hold several examples (batch.segment_ids 1, 2, ...); the LM
  restarts its state where the segment changes. Without it (one example a row, then
  padding) the model runs exactly as before. Either way position t is a target only if
  t + 1 is in the same segment: the loss never crosses a boundary.
  """
  batch = with_loss_targets(batch, packed)
  h = model.embed_inputs(batch.tokens, batch.vision_index, batch.frames,
                         batch.frame_mask)                           # [B, T, C] f32
  return _sums_from_embeddings(model, h, batch, remat_cfg, loss_block_len)


def piece_loss_sums(model: Any, piece: Batch, remat_cfg: RematSettings, n_seq: int,
                    loss_block_len: int = 4096) -> tuple[jax.Array, jax.Array]:
  """`loss_sums` of this device's piece of a micro-batch, inside the sequence-parallel
  shard_map (train/sequence.py): `piece` holds [b, T/n] tokens with their targets,
  weights (and reset), and [b, F/n] frames. The caller enters `sequence_axis`. MA-GC with
  time blocks shorter than the piece runs its layer groups as a wavefront over the pieces
  (remat/pipeline.py)."""
  h = sequence.embed_pieces(model, piece.tokens, piece.vision_index, piece.frames,
                            piece.frame_mask, n_seq)                 # [b, T/n, C] f32
  return _sums_from_embeddings(model, h, piece, remat_cfg, loss_block_len)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    remat_cfg: RematSettings, n_micro: int, mesh: Mesh | None = None,
                    packed: bool = False):
  """Returns train_step(state, batch) -> (state, metrics); jit it with donation.

  packed: the batches pack several examples a row (config.data.packing; see loss_sums).

  With a `mesh` whose `fsdp` and `seq` axes have size 1 (data parallel, ZeRO-1), the
  forward and backward run inside a shard_map over the batch axes: each device runs the
  model on its own rows and the gradients are summed once per step (a psum). Left to XLA's
  automatic partitioning, the kernels it cannot split (Pallas / Triton custom calls such as
  the SSD) would run on every row on every device. With FSDP alone the parameters stay
  sharded and XLA partitions the step. With a `seq` axis every layout runs in a shard_map
  over all axes, each device on its piece of its rows (train/sequence.py).
  """
  n_seq = sharding.seq_size(mesh)

  def micro_loss(trainable, frozen, micro):
    model = nnx.merge(graphdef, merge_params(trainable, frozen))
    return loss_sums(model, micro, remat_cfg, packed=packed)

  def grads_and_sums(trainable, frozen, micro, loss_fn=micro_loss):
    """Summed gradients, loss and target tokens over the micro-batches of `micro`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, mb):
      grads_sum, loss_sum, count = carry
      (loss, n_tokens), grads = grad_fn(trainable, frozen, mb)
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, loss_sum + loss, count + n_tokens), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    return grads, loss_sum, count

  def piece_sums(trainable, frozen, micro, t_specs, f_specs):
    """In the shard_map over all axes: this device's pieces -> global sums."""
    def loss_fn(trainable, frozen, mb):
      params = merge_params(sequence.gather_params(trainable, t_specs),
                            sequence.gather_params(frozen, f_specs))
      return piece_loss_sums(nnx.merge(graphdef, params), mb, remat_cfg, n_seq)

    # The context is read while tracing, the backward (custom_vjp rules) included.
    with sequence_axis(SEQ_AXIS, n_seq):
      grads, loss_sum, count = grads_and_sums(trainable, frozen, micro, loss_fn)
    return (sequence.sum_grads(grads, t_specs),
            *jax.lax.psum((loss_sum, count), sharding.MESH_AXES))

  if n_seq > 1:
    def summed(trainable, frozen, micro):
      micro = sequence.pad_frames(micro, n_seq)
      return sequence.over_pieces(mesh, piece_sums, trainable, frozen, micro,
                                  out_specs=lambda t_specs: (t_specs, P(), P()))
  elif mesh is not None and mesh.devices.size > 1 and mesh.shape["fsdp"] == 1:
    def local(trainable, frozen, micro):
      return jax.lax.psum(grads_and_sums(trainable, frozen, micro), BATCH_AXES)
    # micro: [A, rows, ...], rows split over the batch axes.
    summed = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(None, BATCH_AXES)),
                           out_specs=P(), check_vma=False)
  else:
    summed = grads_and_sums

  def train_step(state: TrainState, batch: Batch | Mapping[str, jax.Array]):
    batch = as_batch(batch)
    if n_seq > 1:  # targets need the next token, which may be on the next piece
      batch = with_loss_targets(batch, packed)
    # Micro-batch i takes rows i, i + A, i + 2A, ...: every device's contiguous share of the
    # rows then splits evenly over the micro-batches, so no rows move between devices.
    micro = jax.tree.map(
        lambda a: jnp.swapaxes(a.reshape((-1, n_micro) + a.shape[1:]), 0, 1), batch)
    grads, loss_sum, count = summed(state.trainable, state.frozen, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss_sum / denom, "target_tokens": count,
               "grad_norm": optax.tree.norm(grads)}
    return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, remat_cfg: RematSettings, packed: bool = False,
                   mesh: Mesh | None = None):
  """eval_step(state, batch) -> {"loss_sum", "target_tokens"} (one micro-batch); with a
  `seq` axis in `mesh`, sequence parallel as the train step."""
  n_seq = sharding.seq_size(mesh)

  def eval_step(state: TrainState, batch: Batch | Mapping[str, jax.Array]):
    batch = as_batch(batch)
    if n_seq > 1:
      def local(trainable, frozen, micro, t_specs, f_specs):
        params = merge_params(sequence.gather_params(trainable, t_specs),
                              sequence.gather_params(frozen, f_specs))
        mb = jax.tree.map(lambda a: a[0], micro)
        with sequence_axis(SEQ_AXIS, n_seq):
          sums = piece_loss_sums(nnx.merge(graphdef, params), mb, remat_cfg, n_seq)
        return jax.lax.psum(sums, sharding.MESH_AXES)
      micro = jax.tree.map(lambda a: a[None], with_loss_targets(batch, packed))
      loss, count = sequence.over_pieces(mesh, local, state.trainable, state.frozen,
                                         sequence.pad_frames(micro, n_seq),
                                         out_specs=(P(), P()))
    else:
      model = nnx.merge(graphdef, merge_params(state.trainable, state.frozen))
      loss, count = loss_sums(model, batch, remat_cfg, packed=packed)
    return {"loss_sum": loss, "target_tokens": count}
  return eval_step
