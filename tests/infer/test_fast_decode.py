"""models/decode.py: the unrolled step and layer loop on per-layer weights compute what
`Mamba2LM.step` and `Mamba2LM.apply_layers` compute (bit for bit on CPU), and the Streamer's
unrolled frame step reads a video into the same states as the scanned one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.decode import apply_layers, decode_step, decode_weights
from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import mamba2_config


@pytest.mark.parametrize("compute_dtype,tie", [("bfloat16", True), ("float32", False)])
def test_unrolled_step_and_layers_equal_the_scanned_ones(compute_dtype, tie):
  config = mamba2_config("tiny", compute_dtype=compute_dtype, tie_embeddings=tie,
                         ssd_impl="xla")
  llm = Mamba2LM(config, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(llm)
  block_graphdef = llm.split_layers()[0]
  weights = jax.jit(lambda p: decode_weights(nnx.merge(graphdef, p)))(params)
  kernel = weights.layers[0]["mixer"]["in_proj"]["kernel"]
  assert len(weights.layers) == config.n_layers and kernel.ndim == 2
  assert kernel.dtype == jnp.dtype(compute_dtype)  # cast once, not per token

  # Chunked mode over 11 tokens from zero states, then 6 recurrent steps (batch 2).
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 17)), jnp.int32)
  scanned = jax.jit(lambda p, h, s: nnx.merge(graphdef, p).apply_layers(h, s))
  unrolled = jax.jit(lambda w, h, s: apply_layers(block_graphdef, w, h, s))
  h = llm.embed(tokens[:, :11])
  h_ref, ref = scanned(params, h, llm.init_states(2))
  h_new, new = unrolled(weights, h, llm.init_states(2))
  np.testing.assert_array_equal(h_new, h_ref)
  np.testing.assert_array_equal(new.ssm, ref.ssm)

  step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))
  fast = jax.jit(lambda w, t, c: decode_step(config, block_graphdef, w, t, c))
  for t in range(11, 17):
    logits_ref, ref = step(params, tokens[:, t], ref)
    logits_new, new = fast(weights, tokens[:, t], new)
    np.testing.assert_array_equal(logits_new, logits_ref)
  np.testing.assert_array_equal(new.conv, ref.conv)
  np.testing.assert_array_equal(new.ssm, ref.ssm)


def test_unrolled_frame_step_reads_the_same_states(tiny_model, tokenizer, streamer, sampler):
  """The unrolled Streamer (on the Sampler's per-layer weights) against the shared scanned
  one: the same states after 5 frames (2 full steps and a single-frame step)."""
  unrolled = Streamer(tiny_model, tokenizer, frames_per_step=streamer.frames_per_step,
                      text_chunk=streamer.text_chunk, layer_loop="unrolled",
                      weights=sampler.device_weights())
  frames = np.random.default_rng(1).integers(
      0, 256, (5, streamer.image_size, streamer.image_size, 3), np.uint8)
  ref = streamer.read_frames([frames], 5)
  new = unrolled.read_frames([frames], 5)
  np.testing.assert_allclose(new.states.ssm, ref.states.ssm, rtol=0, atol=1e-6)
  np.testing.assert_allclose(new.states.conv, ref.states.conv, rtol=0, atol=1e-6)
  footprint = unrolled.step_footprints(5)
  assert set(footprint) == {"frames_step[2]", "frames_step[1]"}
  assert all(v > 0 for v in footprint.values())
  with pytest.raises(ValueError, match="layer_loop"):
    Streamer(tiny_model, tokenizer, layer_loop="loop")


def test_questions_read_and_scored_together_match_one_at_a_time(streamer):
  """ask_many (whole chunks of all rows together, then every row's rest in one recurrent
  call) and token_logprobs_rows against ask and token_logprobs row by row. Questions of 1 to
  3 chunks of text_chunk=8 and different rests, continuations of 1 to 6 tokens."""
  frames = np.random.default_rng(2).integers(
      0, 256, (3, streamer.image_size, streamer.image_size, 3), np.uint8)
  video = streamer.read_frames([frames], 3)
  # Every video starts from the system turn's state, read once and kept.
  prefix = video.pieces[0].ids
  saved = streamer._prefix_states[prefix]
  np.testing.assert_array_equal(saved.ssm,
                                streamer.feed_text(streamer.init_states(), prefix)[0].ssm)
  questions = ["Which shape is red?", "What colour is the circle? A. red B. blue C. green",
               "Which way does it move?", "A red circle moves left on a black background."]
  many = streamer.ask_many(video, questions)
  one = [streamer.ask(video, q) for q in questions]
  assert [len(c.pieces[-1].ids) // streamer.text_chunk for c in one] != [0] * 4
  continuations = [[[5], [7, 9, 11]], [[12, 13, 14, 15, 16, 17]], [[3, 4]], [[20], [21, 22]]]
  rows = streamer.token_logprobs_rows(many, continuations)
  for a, b, options, scores in zip(many, one, continuations, rows, strict=True):
    assert a.pieces == b.pieces and a.phase == b.phase
    # Batched rows may round differently (batch R matmuls). Sweep of this check over model
    # seeds 0-16 (17 seeds; the 900 s run stopped there): largest abs differences 3.0e-8
    # (SSM states), 3.0e-7 (logits), 9.5e-7 (log-probs); the tolerances are 10-30x that.
    np.testing.assert_allclose(a.states.ssm, b.states.ssm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for ids, got in zip(options, scores, strict=True):
      np.testing.assert_allclose(got, streamer.token_logprobs(b, ids), rtol=1e-5, atol=1e-5)


def test_text_rest_in_power_of_two_steps_matches_token_steps(tiny_model, tokenizer, streamer):
  """feed_text and feed_text_rows read a text's rest (after its whole chunks of 8) in
  sequence-mode steps of 4, 2, 1 tokens (text_rest='pow2', the default) instead of one
  recurrent step a token ('single'): the same states and logits up to f32 rounding."""
  single = Streamer(tiny_model, tokenizer, frames_per_step=streamer.frames_per_step,
                    text_chunk=8, text_rest="single")
  assert streamer.text_rest == "pow2"
  rng = np.random.default_rng(4)
  start = streamer.init_states()
  rows = [list(rng.integers(3, 200, n)) for n in (1, 5, 7, 8, 13, 15)]
  # Sweep (model seeds 0-3 x token seeds 0-3, these lengths): largest abs differences
  # 4.3e-8 (SSM states), 4.8e-7 (conv states), 2.7e-7 (logits); tolerances 20x and more.
  for ids in rows:
    a, b = streamer.feed_text(start, ids), single.feed_text(start, ids)
    np.testing.assert_allclose(a[0].ssm, b[0].ssm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[0].conv, b[0].conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
  together = streamer.feed_text_rows([start] * len(rows), [None] * len(rows), rows)
  alone = [single.feed_text(start, ids) for ids in rows]
  for (states, logits), (ref_states, ref_logits) in zip(together, alone, strict=True):
    np.testing.assert_allclose(states.ssm, ref_states.ssm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="text_rest"):
    Streamer(tiny_model, tokenizer, text_rest="pairs")
