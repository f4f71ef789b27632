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
    A video whose frame count is not a multiple of M ends with steps of the powers of two
    that sum to the rest (a rest of 7: 4, 2 and 1 frames; `remainder_steps`), so at most
    log2(M) + 2 compiled shapes serve every length. Nothing grows with the video's length:
    device memory is the weights, two copies of the states, and one step's activations. A
    background thread decodes the next micro-batches (data/video_prefetch.py, at most 8
    waiting) while the device runs the current one; at most `max_inflight` steps are
    queued, so host and device memory stay bounded too.
  * text: chunks of `text_chunk` tokens through one jitted function (logits at the chunk's
    last position only), the rest in steps of the powers of two of its count through the
    same function (`text_rest="single"`: one token at a time through `Mamba2LM.step`).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import SpecialIds, special_ids, vocab_size
from ma2mba_jax.infer.sample import vocab_mask
from ma2mba_jax.models.decode import DecodeWeights, decode_weights
from ma2mba_jax.models.decode import apply_layers as unrolled_layers
from ma2mba_jax.models.mamba2 import LayerStates
from ma2mba_jax.models.video_lm import VideoMa2mba, fast_vision_attention, with_vision_attention
from ma2mba_jax.xla_memory import compiled_footprint

if TYPE_CHECKING:
  from ma2mba_jax.data.video_prefetch import VideoFrames

Array = jax.Array
# progress(frames_read, total_frames), called after each micro-batch is queued.
Progress = Callable[[int, int], None]

# How a frame step runs the LM's layers (Streamer's layer_loop).
LAYER_LOOPS = ("scan", "unrolled")
# How the frames after the last full step are read (Streamer's rest_steps).
REST_STEPS = ("pow2", "single")

# Conversation phases: what the next piece may be.
IN_USER_TURN = "in_user_turn"      # frames given, the user's text comes next (ask)
ANSWERING = "answering"            # ends with <|assistant|>: decode, then add_answer
BETWEEN_TURNS = "between_turns"    # an answer just ended: ask a follow-up question


def remainder_steps(rest: int) -> list[int]:
  """Frame-step sizes for the `rest` frames after the full steps of M: the powers of two in
  `rest`, largest first (7 -> [4, 2, 1]), so a video reads its end in at most log2(M) + 1
  steps instead of `rest` single-frame ones, with few compiled shapes."""
  return [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


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
  max_inflight: steps queued on the device before the host waits. layer_loop: how a frame
  step runs the LM's layers: 'scan' (`Mamba2LM.apply_layers`, a scan over the stacked
  layers) or 'unrolled' (`models/decode.py`: the loop unrolled over per-layer weights,
  `weights` if given, e.g. the Sampler's `device_weights()`, else a copy made here).
  reuse_system_turn: read_frames reads each system turn once and starts every video from
  its saved state (False: read it again for every video, as before issue 19).
  decode_ahead: read_video decodes frames in a background thread while the device reads
  the ones before (and ModelAnswerer decodes the next video during the current one's
  questions); False decodes each micro-batch when it is read, as before issue 19.
  rest_steps: how the frames after the last full step of M are read: 'pow2' in steps of
  the powers of two of their count (`remainder_steps`), 'single' one frame a step (as
  before issue 19).
  text_rest: how the tokens after a text's last whole chunk are read: 'pow2' in sequence-mode
  steps of the powers of two of their count (13 -> 8, 4, 1: at most log2(text_chunk)
  calls, each reading the weights once), 'single' one recurrent step a token (as before
  issue 19).
  vision_attention: the encoder's attention: 'auto' (cuDNN flash attention on a GPU in
  bfloat16, `models.video_lm.fast_vision_attention`, else the model's), or None / 'xla' /
  'cudnn' (models.video_lm.VideoConfig.vision_attention).
  """

  def __init__(self, model: VideoMa2mba, tokenizer: tokenizers.Tokenizer, *,
               frames_per_step: int = 16, text_chunk: int = 32, max_inflight: int = 2,
               layer_loop: str = "scan", weights: DecodeWeights | None = None,
               reuse_system_turn: bool = True, decode_ahead: bool = True,
               rest_steps: str = "pow2", text_rest: str = "pow2",
               vision_attention: str | None = "auto"):
    if frames_per_step < 1 or text_chunk < 1 or max_inflight < 1:
      raise ValueError(f"frames_per_step ({frames_per_step}), text_chunk ({text_chunk}) and "
                       f"max_inflight ({max_inflight}) must be >= 1")
    if rest_steps not in REST_STEPS:
      raise ValueError(f"rest_steps must be one of {REST_STEPS}, got {rest_steps!r}")
    if text_rest not in REST_STEPS:
      raise ValueError(f"text_rest must be one of {REST_STEPS}, got {text_rest!r}")
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    self.tokenizer = tokenizer
    self.ids = special_ids(tokenizer)
    self.frames_per_step = frames_per_step
    self.text_chunk = text_chunk
    self.max_inflight = max_inflight
    self.reuse_system_turn = reuse_system_turn
    self.decode_ahead = decode_ahead
    self.rest_steps = rest_steps
    self.text_rest = text_rest
    self._prefix_states: dict[tuple[int, ...], LayerStates] = {}  # read_frames' system turns
    self.tokens_per_frame = model.config.tokens_per_frame  # K
    self.image_size = model.config.image_size              # S
    self.llm_config = model.llm.config
    # Log-probabilities are taken over the ids the tokenizer knows (as the sampler's).
    self.allowed = vocab_mask(self.llm_config.padded_vocab_size, vocab_size(tokenizer))
    self._init_states = lambda: model.llm.init_states(1)

    self.vision_attention = (fast_vision_attention(model.config)
                             if vision_attention == "auto" else vision_attention)
    model = with_vision_attention(model, self.vision_attention)
    graphdef, params = nnx.split(model)
    llm_graphdef, llm_params = nnx.split(model.llm)
    self._params, self._llm_params = params, llm_params
    self.layer_loop = layer_loop
    block_graphdef = model.llm.split_layers()[0]
    if layer_loop == "unrolled" and weights is None:
      weights = jax.jit(lambda p: decode_weights(nnx.merge(llm_graphdef, p)))(llm_params)
    # What the frame step takes as its parameters.
    self._frame_params = params if layer_loop == "scan" else (params, weights)
    # What a frame step reads that stays resident (left out of its footprint): the
    # unrolled step reads the per-layer copy, not the stacked LM layers.
    self._step_weights = (params if layer_loop == "scan"
                          else (nnx.state((model.vision, model.projector)), weights.layers))

    def frames_step(params, states: LayerStates, frames: Array) -> LayerStates:
      """frames uint8 [m, S, S, 3] -> the states after their m*K tokens (no head).
      params: the model's, or (the model's, DecodeWeights) for the unrolled layer loop."""
      if layer_loop == "unrolled":
        params, weights = params
      video_lm = nnx.merge(graphdef, params)
      embeds = video_lm.encode_images(frames)                      # [m, K, D]
      embeds = embeds.reshape(1, -1, embeds.shape[-1])             # [1, m*K, D]
      if layer_loop == "unrolled":
        _, states = unrolled_layers(block_graphdef, weights, embeds, states)
      else:
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

    def keep_live(live: Array, new: LayerStates, old: LayerStates) -> LayerStates:
      """Row r of `new` where live[r] (bool [R]), else of `old` (states batch R)."""
      return jax.tree.map(
          lambda n, o: jnp.where(live.reshape((1, -1) + (1,) * (n.ndim - 2)), n, o), new, old)

    def text_rows(params, states: LayerStates, logits: Array, tokens: Array,
                  live: Array) -> tuple[LayerStates, Array]:
      """`text_step` for R rows at once: states batch R, logits [R, V], tokens int32
      [R, Q]; rows where live (bool [R]) is False keep their states and logits."""
      llm = nnx.merge(llm_graphdef, params)
      h, new_states = llm.apply_layers(llm.embed(tokens), states)
      return (keep_live(live, new_states, states),
              jnp.where(live[:, None], llm.head(h[:, -1]), logits))

    def tokens_rows(params, states: LayerStates, logits: Array, tokens: Array,
                    lengths: Array) -> tuple[LayerStates, Array]:
      """R rows read token by token with the recurrent step, in one call: states batch R,
      logits [R, V] (kept for a row that reads nothing), tokens int32 [R, T] (row r's
      first lengths[r] are real) -> (states, logits [R, V] after each row's last token).
      A row's state stops changing after its last real token."""
      llm = nnx.merge(llm_graphdef, params)

      def body(carry, t):
        states, logits = carry
        new_logits, new_states = llm.step(tokens[:, t], states)
        live = t < lengths                                         # [R]
        return (keep_live(live, new_states, states),
                jnp.where(live[:, None], new_logits, logits)), None

      (states, logits), _ = jax.lax.scan(body, (states, logits), jnp.arange(tokens.shape[1]))
      return states, logits

    def score_rows(params, states: LayerStates, first_logits: Array, index: Array,
                   tokens: Array, targets: Array, allowed: Array) -> Array:
      """`score_step` for R rows at once, row r from conversation index[r]: states (batch
      C, the conversations') and first_logits [C, V] (their next-token logits, which score
      each row's first target); tokens int32 [R, T] (a row's targets but the last),
      targets [R, T+1] -> f32 [R, T+1]."""
      llm = nnx.merge(llm_graphdef, params)
      states = jax.tree.map(lambda x: jnp.take(x, index, axis=1), states)
      h, _ = llm.apply_layers(llm.embed(tokens), states)
      first = jnp.take(first_logits, index, axis=0)
      logits = jnp.concatenate([first[:, None], llm.head(h)], axis=1)  # [R, T+1, V]
      logprobs = jax.nn.log_softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
      return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]

    self._frames_step = jax.jit(frames_step)
    self._text_step = jax.jit(text_step)
    self._token_step = jax.jit(token_step)
    self._score_step = jax.jit(score_step)
    def split_rows(states: LayerStates, logits: Array, n: int):
      """States (batch R) and logits [R, V] -> n tuples (states batch 1, logits [V])."""
      return tuple((jax.tree.map(lambda x, r=r: x[:, r:r + 1], states), logits[r])
                   for r in range(n))

    def stack_rows(states: Sequence[LayerStates], logits: Sequence[Array]):
      """Per-row states (batch 1) and logits [V] -> states batch R, logits [R, V]."""
      return (jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *states),
              jnp.stack(logits))

    self._text_rows = jax.jit(text_rows)
    self._tokens_rows = jax.jit(tokens_rows)
    self._score_rows = jax.jit(score_rows)
    self._split_rows = jax.jit(split_rows, static_argnums=2)
    self._stack_rows = jax.jit(stack_rows)

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
    if self.text_rest == "single":
      for token in ids[full:]:
        states, logits = self._token_step(self._llm_params, states, token[None])
      return states, logits
    start = full
    for size in remainder_steps(ids.size - full):
      states, logits = self._text_step(self._llm_params, states, ids[None, start:start + size])
      start += size
    return states, logits

  def feed_frames(self, states: LayerStates, batches: Iterable[np.ndarray], total: int,
                  progress: Progress | None = None) -> LayerStates:
    """Reads frames given as batches of uint8 [m, S, S, 3] (any m; they are regrouped into
    steps of M, the rest in `remainder_steps`) -> the states after all `total` frames."""
    inflight: collections.deque = collections.deque()
    done = 0
    for step_frames in self._regroup(batches):
      states = self._frames_step(self._frame_params, states, step_frames)
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
    """Batches of any size -> [M, S, S, 3] steps, then the remainder's steps."""
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
    start = 0
    for size in self._rest_sizes(pending.shape[0]):
      yield pending[start:start + size]
      start += size

  def _rest_sizes(self, rest: int) -> list[int]:
    """Step sizes for the `rest` (< M) frames after the full steps (rest_steps)."""
    return remainder_steps(rest) if self.rest_steps == "pow2" else [1] * rest

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

  # ------------------------------------------------------------------------- many rows

  def feed_text_rows(self, states: Sequence[LayerStates], logits: Sequence[Array | None],
                     rows: Sequence[Sequence[int]]) -> list[tuple[LayerStates, Array]]:
    """`feed_text` for several rows, each from its own states (batch 1) and next-token
    logits (None: none yet), with few dispatches: the rows' states stacked on the batch
    axis (padded to a power of two), then the c-th whole chunk of `text_chunk` tokens of
    every row that has one in one call per c, then the rest of every row (shorter than a
    chunk) as feed_text reads it: text_rest 'pow2', one call per power-of-two size some
    row's rest holds; 'single', one call of the recurrent step over the rows (padded to a
    power of two >= 8 tokens). Each row goes through the operations feed_text would run;
    rows that are done keep their states. -> per row (states batch 1, logits [V])."""
    q = self.text_chunk
    rows = [np.asarray(ids, np.int32) for ids in rows]
    if len(states) != len(rows) or len(logits) != len(rows):
      raise ValueError(f"{len(rows)} rows but {len(states)} states and {len(logits)} logits")
    if not rows or any(ids.size == 0 for ids in rows):
      raise ValueError("feed_text_rows needs at least one row and one token per row")
    n = len(rows)
    padded_rows = 1 << (n - 1).bit_length()
    zeros = np.zeros((self.llm_config.padded_vocab_size,), np.float32)
    logits = [zeros if row_logits is None else row_logits for row_logits in logits]
    pad = padded_rows - n
    stacked, stacked_logits = self._stack_rows(list(states) + list(states[:1]) * pad,
                                               logits + logits[:1] * pad)
    chunks = [ids.size // q for ids in rows]
    for c in range(max(chunks)):
      tokens = np.zeros((padded_rows, q), np.int32)
      live = np.zeros((padded_rows,), bool)
      for r, ids in enumerate(rows):
        if chunks[r] > c:
          tokens[r], live[r] = ids[c * q:(c + 1) * q], True
      stacked, stacked_logits = self._text_rows(self._llm_params, stacked, stacked_logits,
                                                tokens, live)
    rests = [ids[k * q:] for ids, k in zip(rows, chunks)]
    longest = max(rest.size for rest in rests)
    if longest and self.text_rest == "pow2":
      # feed_text's power-of-two steps, largest first: one call per size that some row's
      # rest holds; the rows without it keep their states.
      offsets = [0] * len(rests)
      for bit in reversed(range(longest.bit_length())):
        size = 1 << bit
        tokens = np.zeros((padded_rows, size), np.int32)
        live = np.zeros((padded_rows,), bool)
        for r, rest in enumerate(rests):
          if rest.size & size:
            tokens[r], live[r] = rest[offsets[r]:offsets[r] + size], True
            offsets[r] += size
        if live.any():
          stacked, stacked_logits = self._text_rows(self._llm_params, stacked, stacked_logits,
                                                    tokens, live)
    elif longest:
      length = max(8, 1 << (longest - 1).bit_length())
      tokens = np.zeros((padded_rows, length), np.int32)
      lengths = np.zeros((padded_rows,), np.int32)
      for r, rest in enumerate(rests):
        tokens[r, :rest.size], lengths[r] = rest, rest.size
      stacked, stacked_logits = self._tokens_rows(self._llm_params, stacked, stacked_logits,
                                                  tokens, lengths)
    return list(self._split_rows(stacked, stacked_logits, n))

  def token_logprobs_rows(self, convs: Sequence[Conversation],
                          continuations: Sequence[Sequence[Sequence[int]]]
                          ) -> list[list[np.ndarray]]:
    """`token_logprobs` of continuations[i][j] after convs[i], for every i and j, in a few
    batched calls: rows are grouped by the padded length token_logprobs would use (so each
    row computes what token_logprobs computes), the conversations' states stacked on the
    batch axis. -> out[i][j]: f32 [len(continuations[i][j])]."""
    if len(convs) != len(continuations):
      raise ValueError(f"{len(convs)} conversations but {len(continuations)} lists of "
                       "continuations")
    for conv in convs:
      if conv.logits is None:
        raise ValueError("a conversation ends in frames; ask a question first")
    out = [[np.zeros((0,), np.float32)] * len(c) for c in continuations]
    groups: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for i, options in enumerate(continuations):
      for j, ids in enumerate(options):
        ids = np.asarray(ids, np.int32)
        if ids.size:
          rest = ids.size - 1
          length = max(8, 1 << (rest - 1).bit_length()) if rest else 8
          groups.setdefault(length, []).append((i, j, ids))
    if not groups:
      return out
    states, all_logits = self._stack_rows([c.states for c in convs],
                                          [c.logits for c in convs])  # batch C, [C, V]
    for length, members in sorted(groups.items()):
      n = len(members)
      padded_rows = 1 << (n - 1).bit_length()
      index = np.zeros((padded_rows,), np.int32)
      inputs = np.zeros((padded_rows, length), np.int32)
      targets = np.zeros((padded_rows, length + 1), np.int32)
      for r, (i, _, ids) in enumerate(members):
        index[r] = i
        inputs[r, :ids.size - 1] = ids[:-1]
        targets[r, :ids.size] = ids
      picked = np.asarray(self._score_rows(self._llm_params, states, all_logits, index,
                                           inputs, targets, self.allowed))
      for r, (i, j, ids) in enumerate(members):
        out[i][j] = picked[r, :ids.size].astype(np.float32)
    return out

  # ------------------------------------------------------------------------- the chat

  def read_frames(self, batches: Iterable[np.ndarray], total: int, *,
                  system_prompt: str = SYSTEM_PROMPT,
                  progress: Progress | None = None) -> Conversation:
    """System turn, `<|user|>`, then `total` frames given as uint8 [m, S, S, 3] batches."""
    if total < 1:
      raise ValueError("a video needs at least one frame")
    prefix = [self.ids.system, *encode_text(self.tokenizer, system_prompt, self.ids),
              self.ids.endoftext, self.ids.user]
    # Every video starts from the same system turn: read once, then shared (states are
    # never overwritten).
    key = tuple(prefix)
    states = self._prefix_states.get(key) if self.reuse_system_turn else None
    if states is None:
      states = self.feed_text(self.init_states(), prefix)[0]
      if self.reuse_system_turn:
        self._prefix_states[key] = states
    states = self.feed_frames(states, batches, total, progress)
    return Conversation(states, None, (Piece(ids=tuple(prefix)), Piece(frames=total)),
                        IN_USER_TURN)

  def video_frames(self, path: str, *, fps: float = 1.0, max_frames: int | None = None,
                   decode_threads: int = 0) -> VideoFrames:
    """Starts decoding the video at `fps` (every frame on that grid; `max_frames` spreads
    that many evenly instead), M frames a batch, in a background thread (decode_ahead; for
    read_video: started early, it decodes while the model reads something else)."""
    # PyAV only where videos are read (the benchmark streams frames made in memory).
    from ma2mba_jax.data.video_prefetch import VideoFrames
    return VideoFrames(path, image_size=self.image_size, frames_per_batch=self.frames_per_step,
                       fps=fps, max_frames=max_frames, decode_threads=decode_threads,
                       background=self.decode_ahead)

  def read_video(self, video: str | VideoFrames, *, fps: float = 1.0,
                 max_frames: int | None = None, system_prompt: str = SYSTEM_PROMPT,
                 progress: Progress | None = None, decode_threads: int = 0) -> Conversation:
    """Reads a video (a path, decoded as `video_frames(path, fps=..., ...)`, or frames
    already being decoded by `video_frames`, which it closes), as `read_frames`. The frames
    are decoded in a background thread while the device reads the ones before. DataError
    names the file when it is missing or corrupt."""
    frames = video if not isinstance(video, str) else self.video_frames(
        video, fps=fps, max_frames=max_frames, decode_threads=decode_threads)
    try:
      if (frames.image_size, frames.frames_per_batch) != (self.image_size,
                                                          self.frames_per_step):
        raise ValueError(f"{frames.path}: decoded at {frames.image_size} px, "
                         f"{frames.frames_per_batch} frames a batch; this streamer reads "
                         f"{self.image_size} px, {self.frames_per_step} a step")
      return self.read_frames(frames.batches(), frames.total(), system_prompt=system_prompt,
                              progress=progress)
    finally:
      frames.close()

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

  def ask_many(self, conv: Conversation, questions: Sequence[str]) -> list[Conversation]:
    """`ask` of each question from the same conversation (e.g. every question about one
    video after its frames), the questions read together (`feed_text_rows`)."""
    if conv.phase == ANSWERING:
      raise ValueError("the conversation awaits an answer: add_answer() before asking again")
    rows = []
    for question in questions:
      ids = encode_text(self.tokenizer, question, self.ids) + [self.ids.endoftext,
                                                           self.ids.assistant]
      rows.append([self.ids.user] + ids if conv.phase == BETWEEN_TURNS else ids)
    read = self.feed_text_rows([conv.states] * len(rows), [conv.logits] * len(rows), rows)
    return [Conversation(states, logits, conv.pieces + (Piece(ids=tuple(ids)),), ANSWERING)
            for (states, logits), ids in zip(read, rows, strict=True)]

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
    sizes = ([m] if num_frames >= m else []) + sorted(set(self._rest_sizes(num_frames % m)),
                                                      reverse=True)
    states = jax.eval_shape(self.init_states)
    out = {}
    for size in sizes:
      frames = jax.ShapeDtypeStruct((size, s, s, 3), jnp.uint8)
      out[f"frames_step[{size}]"] = compiled_footprint(
          self._frames_step, self._frame_params, states, frames, exclude=self._step_weights)
    return out

