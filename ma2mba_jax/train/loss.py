"""Next-token cross-entropy over hidden states, in blocks of tokens.

The full logits of a long sequence do not fit (2^19 tokens x 50k vocabulary in f32 is
100 GB), so the head runs on blocks of tokens inside a scan, each block under
jax.checkpoint: only the hidden states and one block's logits are alive at a time.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def shift_targets(tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """tokens, loss_mask [B, T] -> targets, weights [B, T]: position t predicts token t+1,
  counted where loss_mask[t+1] (the data marks the tokens the model must produce)."""
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
  weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
  return targets, weights.astype(jnp.float32)


def blockwise_cross_entropy(h: jax.Array, head: Callable[[jax.Array], jax.Array],
                            targets: jax.Array, weights: jax.Array, *,
                            block_len: int = 4096) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted cross-entropies and sum of weights.

  h [B, T, D]; head: [B, t, D] -> logits [B, t, V] f32; targets int32 [B, T]; weights [B, T].
  """
  batch, seqlen, width = h.shape
  block_len = min(block_len, seqlen)
  pad = (-seqlen) % block_len
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n_blocks = (seqlen + pad) // block_len
  blocks = lambda a: jnp.moveaxis(a.reshape((batch, n_blocks, block_len) + a.shape[2:]), 1, 0)

  @jax.checkpoint
  def block_loss(h_blk, target_blk, weight_blk):
    logits = head(h_blk).astype(jnp.float32)                        # [B, t, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, target_blk[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weight_blk)

  def step(total, xs):
    return total + block_loss(*xs), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                          (blocks(h), blocks(targets), blocks(weights)))
  return total, jnp.sum(weights)
