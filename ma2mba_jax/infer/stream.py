"""Streaming prefill: a chat prompt and a video of any length read into the LM's fixed-size
recurrent state, in constant device memory.

The paper's layout (Table 5), frames at the start of the first user turn, before its text:

    <|system|>You are a helpful assistant.<|endoftext|><|user|>   read_video: text, then
    [K tokens of frame 1] ... [K tokens of frame F]                  the frames, M at a time
    question<|endoftext|><|assistant|>                            ask
    answer<|endoftext|>                                           add_answer (after decoding)
    <|user|>next question<|endoftext|><|assistant|>               ask (a follow-up) ...

Everything the model reads goes through the LM's chunked mode, carrying every layer's
LayerStates (conv [L, 1, C, K-1] and SSM [L, 1, H, P, N], f32) from one piece to the next:

  * frames: decoded with PyAV at `fps` (1 by default, every frame at that rate) M =
    `frames_per_step` at a time; one jitted step of fixed shape encodes them
    (vision -> pooling -> projector: [M, S, S, 3] -> [1, M*K, D]) and runs the LM's layers
    over those M*K embeddings -> new states. The LM head is never applied to frame positions.
    A video whose frame count is not a multiple of M ends with single-frame steps, so two
    compiled shapes serve every length. Nothing grows with the video's length: device
    memory is the weights, two copies of the states, and one step's activations. The host
    decodes the next micro-batch while the device runs the current one; at most
    `max_inflight` steps are queued, so host and device memory stay bounded too.
  * text: chunks of `text_chunk` tokens through one jitted function (logits at the chunk's
    last position only), the rest one token at a time through `Mamba2LM.step`.

A `Conversation` is immutable: its states are never donated or overwritten, so one saved
state (e.g. the video read once) can be continued many times (each question of a benchmark,
each option scored by likelihood). The chunked and recurrent modes compute the same function
as a full forward pass over the whole token sequence (tests/infer/test_stream.py checks the
tokens decoded after streaming against full passes).

Axis legend: F frames, M frames per step, S frame side, K tokens per frame, D LM width,
T tokens, V (padded) vocabulary, L layers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import SpecialIds, special_ids, vocab_size
from ma2mba_jax.infer.sample import vocab_mask
from ma2mba_jax.models.mamba2 import LayerStates
from ma2mba_jax.models.video_lm import VideoMa2mba

Array = jax.Array
# progress(frames_read, total_frames), called after each micro-batch is queued.
Progress = Callable[[int, int], None]

# Conversation phases: what the next piece may be.
IN_USER_TURN = "in_user_turn"      # frames given, the user's text comes next (ask)
ANSWERING = "answering"            # ends with <|assistant|>: decode, then add_answer
BETWEEN_TURNS = "between_turns"    # an answer just ended: ask a follow-up question


@dataclasses.dataclass(frozen=True)
class Piece:
  """What the state has read: text token ids, or `frames` frames of K tokens each."""
  ids: tuple[int, ...] = ()
  frames: int = 0


@dataclasses.dataclass(frozen=True)
class Conversation:
  """The running state of a chat about a video.

  states: LayerStates after the last piece (batch 1). logits: [V] f32 next-token logits
  after the last piece (None after frames: no head is computed there). pieces: everything
  read, in order. phase: IN_USER_TURN | ANSWERING | BETWEEN_TURNS.
  """
  states: LayerStates
  logits: Array | None
  pieces: tuple[Piece, ...]
  phase: str

  @property
  def num_frames(self) -> int:
    return sum(p.frames for p in self.pieces)

  def token_ids(self, tokens_per_frame: int, frame_id: int) -> np.ndarray:
    """int32 [T]: the token sequence read so far, `frame_id` at each vision position (the
    chat template's layout, for checks and full-sequence comparisons)."""
    parts = [np.asarray(p.ids, np.int32) if not p.frames
             else np.full((p.frames * tokens_per_frame,), frame_id, np.int32)
             for p in self.pieces]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def encode_text(tokenizer: tokenizers.Tokenizer, text: str, ids: SpecialIds) -> list[int]:
  """Plain text -> ids, special-token strings kept as plain text (as the template does)."""
  tokenizer.encode_special_tokens = True
  out = tokenizer.encode(text, add_special_tokens=False).ids if text else []
  special = {ids.endoftext, ids.system, ids.user, ids.assistant, ids.frame}
  if special.intersection(out):
    raise DataError(f"text {text[:80]!r} encodes to a special token id of the chat template")
  return out


class Streamer:
  """Reads prompts and videos into Conversations with fixed-shape jitted steps.

  model: a VideoMa2mba (e.g. `convert.io.restore_model(dir)`); tokenizer: its tokenizer
  (with the chat template's special tokens). frames_per_step: M, frames encoded and read
  per step (memory grows with M, never with F). text_chunk: tokens per chunked text call.
  max_inflight: steps queued on the device before the host waits.
  """

  def __init__(self, model: VideoMa2mba, tokenizer: tokenizers.Tokenizer, *,
               frames_per_step: int = 16, text_chunk: int = 32, max_inflight: int = 2):
    if frames_per_step < 1 or text_chunk < 1 or max_inflight < 1:
      raise ValueError(f"frames_per_step ({frames_per_step}), text_chunk ({text_chunk}) and "
                       f"max_inflight ({max_inflight}) must be >= 1")
    self.tokenizer = tokenizer
    self.ids = special_ids(tokenizer)
    self.frames_per_step = frames_per_step
    self.text_chunk = text_chunk
    self.max_inflight = max_inflight
    self.tokens_per_frame = model.config.tokens_per_frame  # K
    self.image_size = model.config.image_size              # S
    self.llm_config = model.llm.config
    # Log-probabilities are taken over the ids the tokenizer knows (as the sampler's).
    self.allowed = vocab_mask(self.llm_config.padded_vocab_size, vocab_size(tokenizer))
    self._init_states = lambda: model.llm.init_states(1)

    graphdef, params = nnx.split(model)
    llm_graphdef, llm_params = nnx.split(model.llm)
    self._params, self._llm_params = params, llm_params

    def frames_step(params, states: LayerStates, frames: Array) -> LayerStates:
      """frames uint8 [m, S, S, 3] -> the states after their m*K tokens (no head)."""
      video_lm = nnx.merge(graphdef, params)
      embeds = video_lm.encode_images(frames)                      # [m, K, D]
      embeds = embeds.reshape(1, -1, embeds.shape[-1])             # [1, m*K, D]
      _, states = video_lm.llm.apply_layers(embeds, states)
      return states

    def text_step(params, states: LayerStates, tokens: Array) -> tuple[LayerStates, Array]:
      """tokens int32 [1, Q] -> (states, logits [V] at the last token only)."""
      llm = nnx.merge(llm_graphdef, params)
      h, states = llm.apply_layers(llm.embed(tokens), states)     # h: [1, Q, D]
      return states, llm.head(h[:, -1])[0]

    def token_step(params, states: LayerStates, token: Array) -> tuple[LayerStates, Array]:
      """token int32 [1] -> (states, logits [V]): the recurrent mode."""
      llm = nnx.merge(llm_graphdef, params)
      logits, states = llm.step(token, states)
      return states, logits[0]

    def score_step(params, states: LayerStates, tokens: Array, targets: Array,
                   allowed: Array) -> Array:
      """tokens, targets int32 [1, T] -> f32 [T]: log p(targets[t] | ..., tokens[:t+1])."""
      llm = nnx.merge(llm_graphdef, params)
      h, _ = llm.apply_layers(llm.embed(tokens), states)
      logits = jnp.where(allowed, llm.head(h)[0], -jnp.inf)        # [T, V]
      logprobs = jax.nn.log_softmax(logits, axis=-1)
      return jnp.take_along_axis(logprobs, targets[0][:, None], axis=-1)[:, 0]

    self._frames_step = jax.jit(frames_step)
    self._text_step = jax.jit(text_step)
    self._token_step = jax.jit(token_step)
    self._score_step = jax.jit(score_step)

  # ------------------------------------------------------------------------- low level

  def init_states(self) -> LayerStates:
    """Zero states, batch 1."""
    return self._init_states()

  def feed_text(self, states: LayerStates, ids: Sequence[int]) -> tuple[LayerStates, Array]:
    """Reads token ids (at least one) -> (states, next-token logits [V] after the last)."""
    ids = np.asarray(ids, np.int32)
    if ids.size == 0:
      raise ValueError("feed_text needs at least one token")
    q = self.text_chunk
    full = ids.size // q * q
    logits = None
    for start in range(0, full, q):
      states, logits = self._text_step(self._llm_params, states, ids[None, start:start + q])
    for token in ids[full:]:
      states, logits = self._token_step(self._llm_params, states, token[None])
    return states, logits

  def feed_frames(self, states: LayerStates, batches: Iterable[np.ndarray], total: int,
                  progress: Progress | None = None) -> LayerStates:
    """Reads frames given as batches of uint8 [m, S, S, 3] (any m; they are regrouped into
    steps of M, the rest one frame a step) -> the states after all `total` frames."""
    inflight: collections.deque = collections.deque()
    done = 0
    for step_frames in self._regroup(batches):
      states = self._frames_step(self._params, states, step_frames)
      done += step_frames.shape[0]
      inflight.append(states)
      if len(inflight) > self.max_inflight:  # keep the host at most a few steps ahead
        jax.block_until_ready(inflight.popleft())
      if progress is not None:
        progress(done, total)
    if done != total:
      raise DataError(f"expected {total} frames, read {done}")
    return states

  def _regroup(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Batches of any size -> [M, S, S, 3] steps, then [1, S, S, 3] for the remainder."""
    m, s = self.frames_per_step, self.image_size
    pending = np.zeros((0, s, s, 3), np.uint8)
    for batch in batches:
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
        raise ValueError(f"frames must be [m, {s}, {s}, 3], got {batch.shape}")
      pending = np.concatenate([pending, batch]) if pending.size else batch
      while pending.shape[0] >= m:
        yield pending[:m]
        pending = pending[m:]
    for i in range(pending.shape[0]):
      yield pending[i:i + 1]

  def token_logprobs(self, conv: Conversation, ids: Sequence[int]) -> np.ndarray:
    """f32 [n]: log p(ids[i] | conversation, ids[:i]) for a continuation of n tokens, read
    from the conversation's saved state (which stays as it was).

    The continuation is padded to a power of two (at least 8) so that few shapes compile;
    the LM is causal, so padding after the last token changes no log-prob before it.
    """
    ids = np.asarray(ids, np.int32)
    if conv.logits is None:
      raise ValueError("the conversation ends in frames; ask a question first")
    if ids.size == 0:
      return np.zeros((0,), np.float32)
    first = jax.nn.log_softmax(jnp.where(self.allowed, conv.logits, -jnp.inf))[ids[0]]
    rest = ids.size - 1
    if not rest:
      return np.asarray([first], np.float32)
    length = max(8, 1 << (rest - 1).bit_length())
    inputs, targets = np.zeros((2, 1, length), np.int32)
    inputs[0, :rest], targets[0, :rest] = ids[:-1], ids[1:]
    picked = self._score_step(self._llm_params, conv.states, inputs, targets, self.allowed)
    return np.concatenate([[float(first)], np.asarray(picked)[:rest]]).astype(np.float32)

  # ------------------------------------------------------------------------- the chat

  def read_frames(self, batches: Iterable[np.ndarray], total: int, *,
                  system_prompt: str = SYSTEM_PROMPT,
                  progress: Progress | None = None) -> Conversation:
    """System turn, `<|user|>`, then `total` frames given as uint8 [m, S, S, 3] batches."""
    if total < 1:
      raise ValueError("a video needs at least one frame")
    prefix = [self.ids.system, *encode_text(self.tokenizer, system_prompt, self.ids),
              self.ids.endoftext, self.ids.user]
    states, _ = self.feed_text(self.init_states(), prefix)
    states = self.feed_frames(states, batches, total, progress)
    return Conversation(states, None, (Piece(ids=tuple(prefix)), Piece(frames=total)),
                        IN_USER_TURN)

  def read_video(self, path: str, *, fps: float = 1.0, max_frames: int | None = None,
                 system_prompt: str = SYSTEM_PROMPT, progress: Progress | None = None,
                 decode_threads: int = 0) -> Conversation:
    """Decodes the video at `fps` (every frame on that grid; `max_frames` spreads that many
    evenly instead) M frames at a time and reads it, as `read_frames`. DataError names the
    file when it is missing or corrupt."""
    # PyAV only where videos are read (the benchmark streams frames made in memory).
    from ma2mba_jax.data.video import Video, frame_times
    with Video(path, threads=decode_threads) as video:
      times = frame_times(video.duration, fps=fps, max_frames=max_frames, path=video.path)
      m = self.frames_per_step
      batches = (video.frames_at(times[i:i + m], self.image_size)
                 for i in range(0, times.size, m))
      return self.read_frames(batches, int(times.size), system_prompt=system_prompt,
                              progress=progress)

  def ask(self, conv: Conversation, question: str) -> Conversation:
    """The user's text, `<|endoftext|><|assistant|>`: right after the frames of the first
    turn, or as a new `<|user|>` turn after an answer. The result is ready to decode."""
    if conv.phase == ANSWERING:
      raise ValueError("the conversation awaits an answer: add_answer() before asking again")
    ids = encode_text(self.tokenizer, question, self.ids) + [self.ids.endoftext,
                                                         self.ids.assistant]
    if conv.phase == BETWEEN_TURNS:
      ids = [self.ids.user] + ids
    states, logits = self.feed_text(conv.states, ids)
    return Conversation(states, logits, conv.pieces + (Piece(ids=tuple(ids)),), ANSWERING)

  def add_answer(self, conv: Conversation, answer_ids: Sequence[int]) -> Conversation:
    """Reads the assistant's answer and its `<|endoftext|>` from the state after the
    question (the answer as kept: a trimmed repeat is not read), closing the turn."""
    if conv.phase != ANSWERING:
      raise ValueError("add_answer needs a conversation that ends with a question (ask())")
    ids = [int(i) for i in answer_ids]
    if ids and ids[-1] == self.ids.endoftext:
      ids = ids[:-1]
    ids.append(self.ids.endoftext)
    states, logits = self.feed_text(conv.states, ids)
    return Conversation(states, logits, conv.pieces + (Piece(ids=tuple(ids)),), BETWEEN_TURNS)

  # ------------------------------------------------------------------------- memory

  def step_footprints(self, num_frames: int) -> dict[str, int]:
    """Bytes XLA plans for each frame step a video of `num_frames` frames uses: temporaries
    + outputs + inputs other than the parameters (compiled memory analysis, any backend).
    By construction the same for every video length; tests check it against a one-shot
    forward pass, whose footprint grows with the length."""
    s, m = self.image_size, self.frames_per_step
    sizes = ([m] if num_frames >= m else []) + ([1] if num_frames % m else [])
    states = jax.eval_shape(self.init_states)
    out = {}
    for size in sizes:
      frames = jax.ShapeDtypeStruct((size, s, s, 3), jnp.uint8)
      out[f"frames_step[{size}]"] = compiled_footprint(
          self._frames_step, self._params, states, frames, exclude=self._params)
    return out


def compiled_footprint(jitted, *args, exclude=None) -> int:
  """temp + output + argument bytes of XLA's plan for jitted(*args), minus the bytes of the
  pytree `exclude` (e.g. the parameters, resident anyway)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  excluded = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(exclude)) if exclude is not None else 0
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes
             + analysis.argument_size_in_bytes - excluded)
