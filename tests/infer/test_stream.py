"""Streaming prefill and recurrent decoding against full forward passes; the stop rule; the
prefill step's memory against the one-shot forward's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.data.template import ChatTurn, render, render_prompt
from ma2mba_jax.data.video import decode_video
from ma2mba_jax.infer.sample import (RepeatStop, SamplingParams, choose_token, repeats_earlier,
                                     top_p_filter)
from ma2mba_jax.infer.stream import Streamer, remainder_steps
from ma2mba_jax.xla_memory import compiled_footprint

QUESTION = "What colour is the circle?"
FOLLOWUP = "Which way does it move?"
ANSWER = "A red circle"
NEW_TOKENS = 8
# Every full pass is padded to this length (one compilation); the model is causal, so the
# logits at position t do not depend on the padding after it.
PADDED_LEN = 96


@pytest.fixture(scope="module")
def full_forward(tiny_model):
  """(tokens [T], vision_index [T], frames [F, S, S, 3]) -> logits [T, V]: the whole
  sequence in one full-mode pass (padded to PADDED_LEN)."""
  graphdef, params = nnx.split(tiny_model)

  @jax.jit
  def forward(params, tokens, vision_index, frames):
    return nnx.merge(graphdef, params)(tokens, vision_index, frames)

  def run(tokens, vision_index, frames):
    n = len(tokens)
    assert n <= PADDED_LEN
    padded_tokens = np.zeros((1, PADDED_LEN), np.int32)
    padded_index = np.full((1, PADDED_LEN), -1, np.int32)
    padded_tokens[0, :n], padded_index[0, :n] = tokens, vision_index
    return np.asarray(forward(params, padded_tokens, padded_index, frames[None])[0, :n])
  return run


def _masked_argmax(logits, allowed):
  return int(np.argmax(np.where(np.asarray(allowed), logits, -np.inf)))


def test_streaming_then_decoding_matches_full_passes(streamer, sampler, tokenizer, video,
                                                     full_forward):
  k = streamer.tokens_per_frame
  frames, _ = decode_video(video, fps=1, size=streamer.image_size)
  progress = []
  conv = streamer.read_video(video, fps=1, progress=lambda done, total: progress.append(
      (done, total)))
  assert progress == [(2, 5), (4, 5), (5, 5)]  # two steps of 2 frames, then one frame
  conv = streamer.ask(conv, QUESTION)

  # The streamed layout is the chat template's (frames before the first question).
  prompt = render_prompt(QUESTION, num_frames=5, tokenizer=tokenizer, tokens_per_frame=k)
  np.testing.assert_array_equal(conv.token_ids(k, streamer.ids.frame), prompt.tokens)

  # Greedy decoding from the streamed state == the argmax of a full pass over the prompt
  # and the tokens so far, at every step.
  generation = sampler.generate(conv.states, conv.logits,
                                SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_repeat=False))
  tokens, index, expected = list(prompt.tokens), list(prompt.vision_index), []
  for _ in range(NEW_TOKENS):
    token = _masked_argmax(full_forward(tokens, index, frames)[-1], sampler.allowed)
    expected.append(token)
    if token == streamer.ids.endoftext:
      break
    tokens.append(token)
    index.append(-1)
  assert list(generation.sampled) == expected
  assert len(expected) >= 3, "too short to compare: the random model stopped at once"

  # Log-probs of a continuation scored from the saved state == the full pass's.
  continuation = tokenizer.encode(ANSWER).ids + [streamer.ids.endoftext]
  scored = streamer.token_logprobs(conv, continuation)
  logits = full_forward(list(prompt.tokens) + continuation[:-1],
                        list(prompt.vision_index) + [-1] * (len(continuation) - 1), frames)
  logits = np.where(np.asarray(streamer.allowed), logits[-len(continuation):], -np.inf)
  reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  np.testing.assert_allclose(scored, reference[np.arange(len(continuation)), continuation],
                             rtol=1e-4, atol=1e-4)

  # A follow-up continues the running state: answer<|endoftext|><|user|>q<|endoftext|>
  # <|assistant|>, as the template renders the two-turn chat.
  conv2 = streamer.ask(streamer.add_answer(conv, tokenizer.encode(ANSWER).ids), FOLLOWUP)
  chat = render([ChatTurn(5, QUESTION, ANSWER), ChatTurn(0, FOLLOWUP, "")],
                tokenizer=tokenizer, tokens_per_frame=k, open_last=True)
  np.testing.assert_array_equal(conv2.token_ids(k, streamer.ids.frame), chat.tokens)
  logits = full_forward(list(chat.tokens), list(chat.vision_index), frames)[-1]
  np.testing.assert_allclose(np.asarray(conv2.logits), logits, rtol=1e-4, atol=1e-4)
  # The first conversation's state is untouched: decoding it again gives the same tokens.
  again = sampler.generate(conv.states, conv.logits,
                           SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_repeat=False))
  assert again.sampled == generation.sampled


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(streamer, sampler, video):
  conv = streamer.ask(streamer.read_video(video, fps=1), QUESTION)
  greedy = sampler.generate(conv.states, conv.logits, SamplingParams(max_new_tokens=6))
  hot = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=3)
  first = sampler.generate(conv.states, conv.logits, hot)
  assert sampler.generate(conv.states, conv.logits, hot) == first
  # A nucleus of (almost) zero mass keeps only the most likely token: greedy again.
  narrow = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=3)
  assert sampler.generate(conv.states, conv.logits, narrow) == greedy

  logits = jnp.log(jnp.asarray([0.05, 0.5, 0.15, 0.3]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.float32(0.7))))
  np.testing.assert_array_equal(kept, [False, True, False, True])  # 0.5 + 0.3 >= 0.7
  allowed = jnp.asarray([True, False, True, True])  # the argmax (id 1) is banned
  token = choose_token(logits, allowed, jax.random.key(0), jnp.float32(0), jnp.float32(1))
  assert int(token) == 3


@pytest.mark.parametrize("tokens, stop_at, answer", [
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], 10, [1, 2, 3, 4, 5]),           # plain repeat
    ([9, 1, 2, 3, 4, 5, 8, 1, 2, 3, 4, 5, 7], 12, [9, 1, 2, 3, 4, 5, 8]),
    ([7, 7, 7, 7, 7, 7, 7], 6, [7]),                                 # overlapping windows
    ([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 9, 2, 3, 4, 5], None, None),     # 4-token repeats only
    ([1, 2, 3, 4, 5], None, None),                                   # nothing earlier
])
def test_repeat_stop_rule(tokens, stop_at, answer):
  rule = RepeatStop(5)
  stops = [i + 1 for i, t in enumerate(tokens) if rule.push(t)]
  assert (stops[0] if stops else None) == stop_at
  if stop_at is not None:
    assert repeats_earlier(tokens[:stop_at], 5)
    assert not any(repeats_earlier(tokens[:i], 5) for i in range(stop_at))
    assert tokens[:stop_at - 5] == answer  # what the sampler keeps


@pytest.mark.parametrize("script, params, answer, reason", [
    ([5, 6, 0, 7], SamplingParams(), [5, 6], "eos"),
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6], SamplingParams(), [1, 2, 3, 4, 5], "repeat"),
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6], SamplingParams(stop_on_repeat=False,
                                                       max_new_tokens=11),
     [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6], "length"),
    ([3, 3, 3, 3], SamplingParams(max_new_tokens=3), [3, 3, 3], "length"),
])
def test_sampler_stops_and_trims(sampler, monkeypatch, script, params, answer, reason):
  """The host decoding loop on scripted tokens (id 0 stands for <|endoftext|>); the device
  loop is checked against it in test_decode.py."""
  tokens = iter(script)
  monkeypatch.setattr(sampler, "stop_ids", frozenset({0}))
  monkeypatch.setattr(sampler, "_first", lambda *args: jnp.int32(next(tokens)))
  monkeypatch.setattr(sampler, "_advance",
                      lambda params, cache, *args: (jnp.int32(next(tokens)), cache))
  generation = sampler.generate(None, jnp.zeros((4,)), params, decode_impl="host")
  assert list(generation.tokens) == answer
  assert generation.stop_reason == reason
  assert list(generation.sampled) == script[:len(generation.sampled)]


def test_streaming_prefill_memory_is_flat_while_one_shot_grows(streamer, tiny_model,
                                                               tokenizer, monkeypatch):
  """Reads a video of 8 and one of 32 frames (4x apart, each given as one array) through
  feed_frames, recording every compiled step it really runs; the peak compiled footprint
  (XLA memory analysis) over those steps, and the states carried between them, must be the
  same for both lengths, while a one-shot forward over the same prompt grows with it."""
  k, s = streamer.tokens_per_frame, streamer.image_size
  graphdef, params = nnx.split(tiny_model)
  step = streamer._frames_step
  calls = []

  def recording_step(params, states, frames):
    calls.append(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                              (states, frames)))
    return step(params, states, frames)

  monkeypatch.setattr(streamer, "_frames_step", recording_step)
  one_shot = jax.jit(lambda params, *batch: nnx.merge(graphdef, params)(*batch))
  streamed, carried, full = {}, {}, {}
  rng = np.random.default_rng(0)
  for num_frames in (8, 32):
    calls.clear()
    video = rng.integers(0, 256, (num_frames, s, s, 3), np.uint8)
    states = streamer.feed_frames(streamer.init_states(), [video], num_frames)
    assert len(calls) >= num_frames // streamer.frames_per_step, len(calls)
    signatures = {repr(c): c for c in calls}
    streamed[num_frames] = max(compiled_footprint(step, params, *c, exclude=params)
                               for c in signatures.values())
    carried[num_frames] = sum(a.nbytes for a in jax.tree.leaves(states))
    prompt = render_prompt(QUESTION, num_frames=num_frames, tokenizer=tokenizer,
                           tokens_per_frame=k)
    batch = (prompt.tokens[None], prompt.vision_index[None],
             jax.ShapeDtypeStruct((1, num_frames, s, s, 3), jnp.uint8))
    full[num_frames] = compiled_footprint(one_shot, params, *batch, exclude=params)
  assert streamed[8] == streamed[32], (streamed, full)
  assert carried[8] == carried[32], carried
  assert full[32] > 2 * full[8], (streamed, full)
  assert streamed[32] < full[32] / 3, (streamed, full)


def test_step_footprints_names_the_compiled_frame_steps(streamer):
  """step_footprints: one entry per frame-step shape a video of that length uses."""
  m = streamer.frames_per_step
  assert list(streamer.step_footprints(4 * m)) == [f"frames_step[{m}]"]
  assert list(streamer.step_footprints(4 * m + 1)) == [f"frames_step[{m}]", "frames_step[1]"]


@pytest.mark.parametrize("rest,steps", [(0, []), (1, [1]), (5, [4, 1]), (7, [4, 2, 1]),
                                        (12, [8, 4])])
def test_remainder_steps_are_the_powers_of_two_of_the_rest(rest, steps):
  assert remainder_steps(rest) == steps


def test_the_rest_of_a_video_reads_in_power_of_two_steps(tiny_model, tokenizer, streamer, video):
  """With M = 8 the 5-frame video is read as steps of 4 and 1 frames (not 5 single
  frames), to the same states as the shared streamer's 2 + 2 + 1 (checked against full
  passes in test_streaming_then_decoding_matches_full_passes)."""
  eight = Streamer(tiny_model, tokenizer, frames_per_step=8, text_chunk=8)
  progress = []
  conv = eight.read_video(video, fps=1, progress=lambda done, total: progress.append(
      (done, total)))
  assert progress == [(4, 5), (5, 5)]
  reference = streamer.read_video(video, fps=1)
  for got, want in zip(jax.tree.leaves(conv.states), jax.tree.leaves(reference.states),
                       strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert list(eight.step_footprints(5)) == ["frames_step[4]", "frames_step[1]"]
  single = Streamer(tiny_model, tokenizer, frames_per_step=8, rest_steps="single")
  assert list(single.step_footprints(8 + 7)) == ["frames_step[8]", "frames_step[1]"]
  with pytest.raises(ValueError, match="rest_steps must be one of"):
    Streamer(tiny_model, tokenizer, rest_steps="halves")
  assert list(eight.step_footprints(8 + 7)) == [f"frames_step[{s}]" for s in (8, 4, 2, 1)]
