"""The training loss against a cross-entropy computed by hand, position by position.

The convention (train/loss.py, train/step.py::loss_sums): the logits at position t predict
token t+1; that term counts when loss_mask[t+1] (the data marks the tokens the model must
produce) and segment_ids[t] > 0 (position t is not padding); the last position predicts
nothing. The expected sums below are explicit numpy loops over positions, written from that
sentence and nothing else, so an off-by-one in the library's alignment cannot cancel out.
"""


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ma2mba_jax.data.batch import Batch
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from ma2mba_jax.remat.lm import apply_layers_with_remat
from ma2mba_jax.remat.settings import RematSettings
from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets
from ma2mba_jax.train.step import loss_sums


def hand_loss(logits, tokens, loss_mask, segment_ids=None):
  """logits [B, T, V], tokens/loss_mask [B, T] -> (sum of -log p(token t+1 | logits t),
  number of counted terms), float64, one position at a time."""
  logits = np.asarray(logits, np.float64)
  b, t, _ = logits.shape
  total, count = 0.0, 0
  for i in range(b):
    for pos in range(t - 1):
      if not loss_mask[i, pos + 1]:
        continue
      if segment_ids is not None and segment_ids[i, pos] <= 0:
        continue
      row = logits[i, pos]
      m = row.max()
      log_z = m + np.log(np.sum(np.exp(row - m)))
      total += log_z - row[tokens[i, pos + 1]]
      count += 1
  return total, count


def test_blockwise_cross_entropy_matches_hand_loop():
  """A random linear head, T = 11 in blocks of 4 (padding in the last block)."""
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 11, 6, 13
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t)).astype(np.int32)
  loss_mask = rng.random((b, t)) < 0.6
  loss_mask[0, 1] = True    # position 0 predicts token 1: counted
  loss_mask[1, 1] = False   # ... and not counted
  head = lambda x: x @ w
  targets, weights = shift_targets(jnp.asarray(tokens), jnp.asarray(loss_mask))
  for block_len in (4, 11, 64):
    total, count = blockwise_cross_entropy(jnp.asarray(h), head, targets, weights,
                                           block_len=block_len)
    want_total, want_count = hand_loss(h @ w, tokens, loss_mask)
    assert want_count > 0 and int(count) == want_count, (block_len, int(count), want_count)
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5,
                               err_msg=f"block_len={block_len}")


def test_loss_sums_of_the_video_lm_match_hand_loop():
  """The trainer's loss_sums on the tiny video LM: logits from the model's own forward,
  cross-entropy by hand with the padding rows (segment 0) of a packed batch left out."""
  cfg = video_config("tiny", llm_vocab_size=32)
  model = VideoMa2mba(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  b, t = 2, 24
  tokens = rng.integers(1, 32, (b, t)).astype(np.int32)
  loss_mask = rng.random((b, t)) < 0.6
  segment_ids = np.ones((b, t), np.int32)
  segment_ids[1, 18:] = 0                     # padding at the end of row 1
  loss_mask[1, 18:] = False
  loss_mask[1, 17] = True                     # last real token of row 1 is a target
  batch = dict(tokens=tokens, loss_mask=loss_mask, segment_ids=segment_ids,
               vision_index=np.full((b, t), -1, np.int32),
               frames=None, frame_mask=None)
  remat = RematSettings(policy="none", l=None, s=None, cell_saves="nothing",
                        save_names=(), offload="none")
  total, count = loss_sums(model, Batch.from_dict({k: (None if a is None else jnp.asarray(a))
                                                   for k, a in batch.items()}),
                           remat, loss_block_len=8)
  logits = model(jnp.asarray(tokens), jnp.asarray(batch["vision_index"]))   # [B, T, V]
  want_total, want_count = hand_loss(logits, tokens, loss_mask, segment_ids)
  assert int(count) == want_count, (int(count), want_count)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  # The layers under remat give the same hidden states as the plain forward (so the
  # comparison above is about the loss, not about a different forward).
  h, _ = apply_layers_with_remat(model.llm, model.embed_inputs(jnp.asarray(tokens),
                                                               jnp.asarray(batch["vision_index"])),
                                 remat)
  np.testing.assert_allclose(model.llm.head(h), logits, rtol=1e-5, atol=1e-5)
