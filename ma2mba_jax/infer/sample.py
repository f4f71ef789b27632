"""Recurrent decoding from the LM's states: greedy or sampled, with the paper's stop rule,
as one on-device loop (the default) or one jitted step per token driven from the host.

    sampler = Sampler(model.llm, vocab_size=tokenizer_vocab, stop_ids=(eot,), banned_ids=(frame,))
    generation = sampler.generate(conv.states, conv.logits, SamplingParams(temperature=0.0))
    generations = sampler.generate_batch(states_b, logits_b, params)   # B answers at once

Two loops compute the same tokens (tests/infer/test_decode.py checks it):
  * decode_impl="device": a jitted `lax.while_loop` carries the LM's recurrent cache, the
    buffer of generated tokens [B, max_new_tokens + k - 1] and the stop state; the model
    step, the choice of the next token and the stop checks all run on the device. It runs
    until every row stopped or `block_tokens` more tokens were generated; the host then
    reads the new tokens (to stream them) and dispatches the next block. Without a block
    size (and no `on_tokens` callback) an answer is one dispatch. Each iteration of the
    while loop decodes k = `tokens_per_iteration` tokens (an inner loop of a fixed trip
    count): on a GPU, XLA copies a while loop's condition to the host and waits for it
    before every iteration, and with k tokens that wait comes once every k tokens. Tokens
    decoded after a row stopped change nothing of its answer; the loop ends at most k - 1
    tokens after the last row stopped (block sizes are rounded up to multiples of k).
  * decode_impl="host": the reference. One call of a jitted step per token, the host
    checking the stop rules (`RepeatStop`) between tokens.
Both loops run the same LM step (step_impl="auto", the default: "fused_mixed" on GPU,
"unrolled" elsewhere): `models/decode.py`'s (step_impl="unrolled"),
the layer loop unrolled over weights split per layer and cast to the compute dtype once,
when the Sampler first decodes (a copy of the LM's matrices kept on the device); or
`Mamba2LM.step` (step_impl="scan": a scan over the stacked layers, no copy); or
step_impl="fused": the unrolled loop with each layer's middle (conv, dt, SSM update,
readout, gating) one kernel (`models/decode.fused_decode_step`, a Pallas kernel on GPU)
and the RMS norms folded around the matmuls; or step_impl="fused_gemv": the same with the
matmuls also Pallas kernels that compute the norms inside (three kernels a layer; in_proj
padded once; at most 16 rows); or step_impl="fused_reduce": the fused step's function in
three kernels a layer, in_proj as XLA's multiply-and-reduce and out_proj a Pallas kernel
that also writes the next layer's norm input; or step_impl="fused_mixed": fused_reduce for
one row (the fastest at batch 1 on an H100) and the fused step for more rows (faster
there), on one copy of the weights (in_proj padded to a multiple of REDUCE_PAD rows).
The unrolled and scanned steps compute the same function (bit for bit on CPU; on GPU XLA
fuses them differently, so their last bits may differ and long greedy answers of a random
model may part); the fused one the same up to rounding.

Choosing a token from the logits [B, V] (the same function in both loops):
  * ids >= vocab_size (the embedding's padding rows) and `banned_ids` (e.g. `<|frame|>`,
    which is never a target in training) get probability 0;
  * repetition_penalty r != 1 (CTRL / HF style): the logit x of every id already generated
    in this answer becomes x / r if x > 0 else x * r (the prompt is not counted);
  * temperature 0: greedy (argmax). Otherwise logits / temperature, then the filters, each
    keeping a set of ids (the rest get probability 0):
      top_k k > 0:   ids whose logit is >= the k-th largest (ties kept);
      top_p p < 1:   over the distribution left by top_k (renormalised), the smallest set of
                     most likely ids whose mass reaches p (the most likely id always stays);
      min_p m > 0:   ids whose probability is >= m x the most likely id's;
    then a draw from the kept ids with the key fold_in(fold_in(key(seed), i), b) for the
    i-th generated token of batch row b, so a seed gives the same text.

Stopping, checked after every token, first match wins:
  * 'eos':    the token is one of `stop_ids` (`<|endoftext|>`); it is not part of the answer;
  * 'repeat': the paper's rule. With n = 5: the last n generated tokens, as a sequence, equal
              n consecutive generated tokens that start earlier (windows may overlap the last
              n). Only the generated tokens are compared, never the prompt, so an answer may
              quote the question. The last n tokens (the repeat) are trimmed off the answer;
              the earlier occurrence stays;
  * 'length': max_new_tokens tokens were generated.

Axis legend: B batch, T max_new_tokens, V (padded) vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ma2mba_jax.models.decode import (decode_step, decode_weights, fused_decode_step,
                                      padded_decode_weights)
from ma2mba_jax.models.mamba2 import LayerStates, Mamba2LM

Array = jax.Array


DECODE_IMPLS = ("device", "host")
# Both loops' LM step (see the module docstring); "auto": fused_mixed on GPU, unrolled
# elsewhere.
STEP_IMPLS = ("auto", "unrolled", "scan", "fused", "fused_gemv", "fused_reduce",
              "fused_mixed")
STOP_REASONS = ("", "eos", "repeat", "length")  # the device loop's codes 0..3
# Tokens a device-loop iteration decodes (Sampler's tokens_per_iteration).
TOKENS_PER_ITERATION = 4
# fused_reduce / fused_mixed pad in_proj's rows to a multiple of this (at least one zero row).
REDUCE_PAD = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to decode one answer."""
  # Most tokens to generate (the stop token included).
  max_new_tokens: int = 256
  # 0: greedy; > 0: sample from softmax(logits / temperature).
  temperature: float = 0.0
  # Nucleus sampling: keep the most likely tokens up to this much probability (1: all).
  top_p: float = 1.0
  # Keep the k most likely tokens (0: all).
  top_k: int = 0
  # Keep tokens at least this fraction as likely as the most likely one (0: all).
  min_p: float = 0.0
  # > 1 makes tokens already generated less likely (1: off); see the module docstring.
  repetition_penalty: float = 1.0
  # Seed of the sampling keys.
  seed: int = 0
  # Apply the paper's stop rule (see the module docstring).
  stop_on_repeat: bool = True
  # Length n of the repeated sequence that stops generation.
  repeat_ngram: int = 5

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if self.repetition_penalty <= 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    if self.repeat_ngram < 1:
      raise ValueError(f"repeat_ngram must be >= 1, got {self.repeat_ngram}")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One decoded answer.

  tokens: the answer (no stop token; the repeat trimmed off for stop_reason 'repeat').
  sampled: every token drawn, in order (the stop token and the repeat included).
  stop_reason: 'eos' | 'repeat' | 'length'.
  """
  tokens: tuple[int, ...]
  sampled: tuple[int, ...]
  stop_reason: str


def finish(sampled: Sequence[int], reason: str, repeat_ngram: int) -> Generation:
  """The Generation of the tokens drawn and why they stopped (the answer trimmed)."""
  sampled = tuple(int(t) for t in sampled)
  answer = sampled
  if reason == "eos":
    answer = sampled[:-1]
  elif reason == "repeat":
    answer = sampled[:-repeat_ngram]
  return Generation(tokens=answer, sampled=sampled, stop_reason=reason)


# --------------------------------------------------------------------------- the stop rule


class RepeatStop:
  """The paper's stop rule, incrementally: `push(token)` is True once the last n pushed
  tokens repeat n consecutive pushed tokens that start earlier. O(1) per token."""

  def __init__(self, n: int = 5):
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    self.n = n
    self._tokens: list[int] = []
    self._seen: set[tuple[int, ...]] = set()  # windows starting before the newest one

  def push(self, token: int) -> bool:
    self._tokens.append(int(token))
    n, tokens = self.n, self._tokens
    if len(tokens) > n:  # the window that was newest before this token becomes "earlier"
      self._seen.add(tuple(tokens[-n - 1:-1]))
    return len(tokens) >= n and tuple(tokens[-n:]) in self._seen


def repeats_earlier(tokens: Sequence[int], n: int = 5) -> bool:
  """Whether tokens[-n:] equals tokens[i:i+n] for some i < len(tokens) - n (the rule,
  checked on a whole list; `RepeatStop` checks it token by token)."""
  tokens = list(tokens)
  if len(tokens) < n:
    return False
  last = tokens[-n:]
  return any(tokens[i:i + n] == last for i in range(len(tokens) - n))


def repeat_hits(buffer: Array, newest: Array, n: int) -> Array:
  """The rule on the device: buffer int32 [B, T] of generated tokens (positions > newest
  unused), newest: int32 [] index of the token just written -> bool [B], whether
  buffer[:, newest-n+1 : newest+1] equals n consecutive tokens that start earlier."""
  b, t = buffer.shape
  windows = t - n + 1  # candidate starts 0..t-n
  if windows <= 1:     # no earlier window fits in the buffer
    return jnp.zeros((b,), bool)
  last = jax.lax.dynamic_slice_in_dim(buffer, jnp.maximum(newest - n + 1, 0), n, axis=1)
  match = jnp.ones((b, windows), bool)
  for m in range(n):
    match &= buffer[:, m:m + windows] == last[:, m:m + 1]
  earlier = jnp.arange(windows) < newest - n + 1  # also needs newest >= n
  return jnp.any(match & earlier, axis=1)


# --------------------------------------------------------------------------- token choice


def vocab_mask(padded_vocab: int, vocab_size: int, banned_ids: Sequence[int] = ()) -> Array:
  """bool [V]: True for ids that may be generated (or scored): below the tokenizer's
  vocab_size and not banned."""
  if vocab_size > padded_vocab:
    raise ValueError(f"the tokenizer has {vocab_size} ids but the LM has only {padded_vocab} "
                     "embedding rows")
  allowed = np.arange(padded_vocab) < vocab_size
  allowed[list(banned_ids)] = False
  return jnp.asarray(allowed)


def top_p_filter(logits: Array, top_p: Array) -> Array:
  """logits [V] -> logits [V] with -inf outside the nucleus: the smallest set of most
  likely tokens whose probabilities sum to >= top_p (the most likely token always stays)."""
  probs = jax.nn.softmax(logits)
  order = jnp.argsort(-probs)                                     # [V] most likely first
  sorted_probs = probs[order]
  before = jnp.cumsum(sorted_probs) - sorted_probs                # mass of the likelier ones
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: Array) -> Array:
  """logits [..., V], seen bool [..., V] (ids generated so far) -> the penalised logits:
  x / penalty where x > 0, x * penalty otherwise, at the seen ids."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


class Knobs(NamedTuple):
  """The sampling values as device scalars (traced: changing them compiles nothing)."""
  temperature: Array   # f32
  top_k: Array         # int32
  top_p: Array         # f32
  min_p: Array         # f32
  penalty: Array       # f32


class Mode(NamedTuple):
  """What is compiled in (static): which filters run, the stop rule's settings."""
  greedy: bool
  penalty: bool
  top_k: bool
  top_p: bool
  min_p: bool
  stop_on_repeat: bool
  repeat_ngram: int


def knobs_of(params: SamplingParams) -> Knobs:
  # numpy scalars: they go to the device with the jitted call that reads them (a jnp
  # scalar made here would be an eager op of its own on the device, ~0.5 ms on a GPU).
  return Knobs(np.float32(params.temperature), np.int32(params.top_k),
               np.float32(params.top_p), np.float32(params.min_p),
               np.float32(params.repetition_penalty))


def mode_of(params: SamplingParams) -> Mode:
  return Mode(greedy=params.temperature == 0, penalty=params.repetition_penalty != 1,
              top_k=params.top_k > 0, top_p=params.top_p < 1, min_p=params.min_p > 0,
              stop_on_repeat=params.stop_on_repeat, repeat_ngram=params.repeat_ngram)


def sampling_keep(logits: Array, knobs: Knobs, mode: Mode) -> Array:
  """logits [V] f32 (already / temperature, -inf at disallowed ids) -> bool [V]: the ids
  top_k, top_p and min_p keep (see the module docstring). One sort serves all three."""
  order = jnp.argsort(-logits)                      # most likely first (stable on ties)
  s = logits[order]
  keep = jnp.isfinite(s)
  if mode.top_k:
    kth = s[jnp.clip(knobs.top_k - 1, 0, s.shape[0] - 1)]
    keep &= s >= kth
  if mode.top_p:
    probs = jax.nn.softmax(jnp.where(keep, s, -jnp.inf))
    before = jnp.cumsum(probs) - probs              # mass of the likelier kept ids
    keep &= before < knobs.top_p
  if mode.min_p:
    keep &= s >= s[0] + jnp.log(knobs.min_p)
  keep = keep.at[0].set(jnp.isfinite(s[0]))         # the most likely id always stays
  return jnp.zeros_like(keep).at[order].set(keep)


def choose(logits: Array, allowed: Array, seen: Array, key: Array, knobs: Knobs,
           mode: Mode) -> Array:
  """logits [B, V] -> int32 [B]: the next token of each row (see the module docstring).
  seen: bool [B, V], the ids each row generated (read only with a repetition penalty);
  key: this step's key (row b draws with fold_in(key, b))."""
  logits = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
  if mode.penalty:
    logits = apply_repetition_penalty(logits, seen, knobs.penalty)
  if mode.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / knobs.temperature
  if mode.top_k or mode.top_p or mode.min_p:
    keep = jax.vmap(lambda row: sampling_keep(row, knobs, mode))(scaled)
    scaled = jnp.where(keep, scaled, -jnp.inf)
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def choose_token(logits: Array, allowed: Array, key: Array, temperature: Array,
                 top_p: Array) -> Array:
  """logits [V] f32 -> int32 token id: greedy when temperature == 0, else nucleus sampling
  (the original one-row form, kept for callers of it)."""
  logits = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
  greedy = jnp.argmax(logits)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sampled = jax.random.categorical(key, top_p_filter(scaled, top_p))
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# --------------------------------------------------------------------------- the device loop


class DecodeState(NamedTuple):
  """What the on-device loop carries between tokens (and between blocks).

  cache: LayerStates (batch B) after reading every token but the last chosen one.
  token: int32 [B], the last chosen token (not read by the LM yet).
  tokens: int32 [B, T + k - 1], every chosen token (positions >= count unused; the k - 1
    past T take the tokens decoded after the last row stopped).
  seen: bool [B, V] ids chosen so far (for the repetition penalty; [B, 1] without one).
  count: int32 [], tokens chosen so far (every row steps together).
  done: bool [B]; reason: int32 [B] (STOP_REASONS index); length: int32 [B], tokens drawn
  when the row stopped (the stop token and the repeat included).
  """
  cache: LayerStates
  token: Array
  tokens: Array
  seen: Array
  count: Array
  done: Array
  reason: Array
  length: Array


def _record(state: DecodeState, token: Array, stop_ids: Array, mode: Mode, max_new: int
            ) -> DecodeState:
  """Writes the token chosen as number state.count + 1 and checks the stop rules (at most
  max_new tokens)."""
  index = state.count
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], index, axis=1)
  seen = state.seen
  if mode.penalty:
    seen = seen | (jnp.arange(seen.shape[1])[None, :] == token[:, None])
  eos = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
  repeat = (repeat_hits(tokens, index, mode.repeat_ngram) if mode.stop_on_repeat
            else jnp.zeros_like(eos))
  full = jnp.broadcast_to(index + 1 >= max_new, eos.shape)
  code = jnp.where(eos, 1, jnp.where(repeat, 2, jnp.where(full, 3, 0))).astype(jnp.int32)
  stopping = ~state.done & (code > 0)
  return DecodeState(
      cache=state.cache, token=token, tokens=tokens, seen=seen, count=index + 1,
      done=state.done | stopping, reason=jnp.where(stopping, code, state.reason),
      length=jnp.where(stopping, index + 1, state.length))


# --------------------------------------------------------------------------- the sampler


class Sampler:
  """Decodes from LayerStates with `Mamba2LM.step`.

  vocab_size: the tokenizer's id count (padding rows beyond it are never chosen).
  stop_ids: ids that end the answer (`<|endoftext|>`); banned_ids: ids never chosen.
  decode_impl: 'device' (the on-device loop) or 'host' (one dispatch per token, the
  reference). block_tokens: tokens per dispatch of the device loop (None: the whole answer
  in one, or 8 when tokens are streamed to an `on_tokens` callback; rounded up to a multiple
  of tokens_per_iteration). tokens_per_iteration: tokens the device loop decodes between
  two reads of its condition by the host (default TOKENS_PER_ITERATION; the loop may decode
  up to this many - 1 tokens after the last row stopped). step_impl: the LM step
  of both loops, 'unrolled' (per-layer weights, made at the first decode), 'fused' (the
  same weights, one kernel per layer's middle), 'fused_gemv' (three kernels a layer),
  'fused_reduce' (three kernels a layer, XLA's reduction for in_proj; tuned and timed at
  one row only), 'fused_mixed' (fused_reduce for one row, fused for more), 'scan'
  (`Mamba2LM.step`) or 'auto' (the default: fused_mixed on GPU, unrolled elsewhere).
  """

  def __init__(self, llm: Mamba2LM, *, vocab_size: int, stop_ids: Sequence[int] = (),
               banned_ids: Sequence[int] = (), decode_impl: str = "device",
               block_tokens: int | None = None, step_impl: str = "auto",
               tokens_per_iteration: int | None = None):
    if decode_impl not in DECODE_IMPLS:
      raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
    if step_impl not in STEP_IMPLS:
      raise ValueError(f"step_impl must be one of {STEP_IMPLS}, got {step_impl!r}")
    if step_impl == "auto":
      # On an H100 the 3.1B model decodes one row at 395-401 tok/s with fused_mixed
      # (fused_reduce's kernels), 341-346 with fused_gemv, 239-241 unrolled (BENCHMARKS.md,
      # "Decoding, sessions 12 and 13"); the Pallas GEMVs are slower than XLA's from 2
      # rows. On CPU the unrolled step is the plain reference (the fused ones differ by
      # rounding).
      step_impl = "fused_mixed" if jax.default_backend() == "gpu" else "unrolled"
    if block_tokens is not None and block_tokens < 1:
      raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    k = TOKENS_PER_ITERATION if tokens_per_iteration is None else tokens_per_iteration
    if k < 1:
      raise ValueError(f"tokens_per_iteration must be >= 1, got {k}")
    self.decode_impl, self.block_tokens, self.tokens_per_iteration = decode_impl, block_tokens, k
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self.allowed = vocab_mask(llm.config.padded_vocab_size, vocab_size, banned_ids)
    self.padded_vocab = llm.config.padded_vocab_size
    graphdef, params = nnx.split(llm)
    self._params = params
    self.step_impl = step_impl
    config, block_graphdef = llm.config, llm.split_layers()[0]
    # The unrolled step's weights: made by the first device decode, then kept.
    # The fused step reads its matrices output-major (decode_weights' `transposed`).
    # fused_reduce's in_proj, XLA's reduction, reads every padding row: 8 at most (the
    # Pallas GEMV of fused_gemv splits its rows in blocks: 256).
    reduce_weights = functools.partial(padded_decode_weights, multiple=REDUCE_PAD)
    make = {"fused_gemv": padded_decode_weights, "fused_reduce": reduce_weights,
            "fused_mixed": reduce_weights,
            "fused": functools.partial(decode_weights, transposed=True)
            }.get(step_impl, decode_weights)
    self._make_weights = jax.jit(lambda params: make(nnx.merge(graphdef, params)))
    self._weights: Any = None
    # The loops' jitted functions take the weights as a flat list of arrays (flattening the
    # nnx.State tree in Python cost ~1 ms a call for the 2.7B LM's 579 arrays).
    self._weight_leaves: list | None = None
    self._weight_tree: Any = None
    self._keys: dict[int, Array] = {}                # sampling keys by seed, made once

    # ---- the host loop: one dispatch per token
    def first(logits, seen, key, knobs, allowed, mode):
      """The first answer token, from the prompt's last logits [B, V]."""
      return choose(logits, allowed, seen, key, knobs, mode)

    def lm_step(weights, token, cache):
      """token int32 [B] -> (logits [B, V], cache) with the step of `step_impl`; weights:
      the DecodeWeights (padded for 'fused_gemv', 'fused_reduce' and 'fused_mixed') or the
      LM's params ('scan')."""
      if step_impl == "unrolled":
        return decode_step(config, block_graphdef, weights, token, cache)
      if step_impl.startswith("fused"):
        # fused_mixed: fused_reduce's kernels for one row; the fused step (XLA's GEMVs)
        # for more, which never reads the padded in_proj's zero columns.
        matmul = {"fused_gemv": "pallas", "fused_reduce": "reduce"}.get(step_impl, "xla")
        if step_impl == "fused_mixed" and token.shape[0] == 1:
          matmul = "reduce"
        return fused_decode_step(config, weights, token, cache, matmul=matmul,
                                 transposed=True)
      return nnx.merge(graphdef, weights).step(token, cache)

    def advance(leaves, cache, token, seen, key, knobs, allowed, mode):
      """token int32 [B] -> (next token int32 [B], cache): one step of the LM, one choice."""
      weights = jax.tree.unflatten(self._weight_tree, leaves)
      logits, cache = lm_step(weights, token, cache)              # [B, V]
      return choose(logits, allowed, seen, key, knobs, mode), cache

    # The LM step itself (weights = device_weights()), e.g. for a bench to compile alone.
    self.lm_step = lm_step
    self._first = jax.jit(first, static_argnames="mode")
    self._advance = jax.jit(advance, static_argnames="mode")
    self._mark = jax.jit(lambda seen, token: seen.at[jnp.arange(token.shape[0]), token].set(True))

    # ---- the device loop
    def start(cache, logits, key, knobs, allowed, stop_ids, *, max_new, mode):
      """The first token from the prompt's logits [B, V] (or [V]) -> the loop's DecodeState."""
      logits = logits.reshape(-1, logits.shape[-1])
      b = logits.shape[0]
      seen = jnp.zeros((b, self.padded_vocab if mode.penalty else 1), bool)
      token = choose(logits, allowed, seen, jax.random.fold_in(key, 0), knobs, mode)
      tokens = jnp.full((b, max_new + k - 1), -1, jnp.int32)
      state = DecodeState(cache=cache, token=token, tokens=tokens,
                          seen=seen, count=jnp.int32(0), done=jnp.zeros((b,), bool),
                          reason=jnp.zeros((b,), jnp.int32), length=jnp.zeros((b,), jnp.int32))
      return _record(state, token, stop_ids, mode, max_new)

    def block(leaves, state, end, key, knobs, allowed, stop_ids, *, mode):
      """Decodes k tokens at a time until every row stopped or `end` tokens were chosen
      (end - state.count: a multiple of k, or past the answer's last token)."""
      weights = jax.tree.unflatten(self._weight_tree, leaves)
      max_new = state.tokens.shape[1] - (k - 1)

      def cond(s):
        return (s.count < end) & ~jnp.all(s.done)

      def one(_, s):
        logits, cache = lm_step(weights, s.token, s.cache)
        token = choose(logits, allowed, s.seen, jax.random.fold_in(key, s.count), knobs, mode)
        return _record(s._replace(cache=cache), token, stop_ids, mode, max_new)

      # The inner loop's trip count is static: XLA runs it without asking the host.
      body = (functools.partial(one, 0) if k == 1 else
              lambda s: jax.lax.fori_loop(0, k, one, s))
      return jax.lax.while_loop(cond, body, state)

    self._start = jax.jit(start, static_argnames=("max_new", "mode"))
    # The loop state is donated: the while loop updates the cache, tokens and stop state in
    # the buffers `start` (or the previous block) made, where XLA would otherwise copy them
    # into fresh ones every dispatch.
    self._block = jax.jit(block, static_argnames="mode", donate_argnames="state")

  # ------------------------------------------------------------------------- API

  def generate(self, states: LayerStates, logits: Array,
               params: SamplingParams = SamplingParams(), *,
               on_tokens: Callable[[list[int]], None] | None = None,
               decode_impl: str | None = None) -> Generation:
    """Decodes an answer after a prompt.

    states: the LayerStates after the prompt (batch 1; left untouched, so the same prompt
      state can be decoded from again). logits: [V] (or [1, V]) next-token logits after the
      prompt's last token. on_tokens(new_tokens): called with the tokens drawn as they come
      (each token with the host loop, each block with the device loop), the stop token and
      the trimmed repeat included.
    """
    impl = decode_impl or self.decode_impl
    if impl == "host":
      return self._generate_host(states, jnp.reshape(logits, (1, -1)), params, on_tokens)
    if impl != "device":
      raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}")
    return self._generate_device(states, logits, params, on_tokens)[0]

  def generate_batch(self, states: LayerStates, logits: Array,
                     params: SamplingParams = SamplingParams(), *,
                     decode_impl: str | None = None) -> list[Generation]:
    """B answers at once: states with batch B (e.g. one question each, stacked on axis 1),
    logits [B, V]. Every row stops on its own; the loop runs until all stopped. The host
    loop decodes the rows one after another (the reference)."""
    logits = jnp.asarray(logits)
    impl = decode_impl or self.decode_impl
    if impl == "host":
      return [self._generate_host(jax.tree.map(lambda x, b=b: x[:, b:b + 1], states),
                                  logits[b:b + 1], params, None)
              for b in range(logits.shape[0])]
    return self._generate_device(states, logits, params, None)

  # ------------------------------------------------------------------------- loops

  def device_weights(self):
    """What the LM step reads (both loops): DecodeWeights (made once) or the LM's params."""
    if self.step_impl == "scan":
      return self._params
    if self._weights is None:
      self._weights = self._make_weights(self._params)
    return self._weights

  def _leaves(self) -> list:
    """device_weights() as the flat list of arrays the loops' jitted functions take."""
    if self._weight_leaves is None:
      self._weight_leaves, self._weight_tree = jax.tree.flatten(self.device_weights())
    return self._weight_leaves

  def _key(self, seed: int) -> Array:
    if seed not in self._keys:
      self._keys[seed] = jax.random.key(seed)
    return self._keys[seed]

  def _generate_device(self, states, logits, params: SamplingParams, on_tokens
                       ) -> list[Generation]:
    mode, knobs = mode_of(params), knobs_of(params)
    key = self._key(params.seed)
    stop_ids = np.asarray(sorted(self.stop_ids) or [-1], np.int32)
    leaves = self._leaves()
    max_new = params.max_new_tokens
    step = self.block_tokens or (8 if on_tokens is not None else max_new)
    k = self.tokens_per_iteration
    step = -(-step // k) * k   # a block never ends inside a loop iteration
    state = self._start(states, logits, key, knobs, self.allowed, stop_ids, max_new=max_new,
                        mode=mode)
    shown = 0
    while True:
      count, done = jax.device_get((state.count, state.done))
      count = int(count)
      if on_tokens is not None:
        upto = int(jax.device_get(state.length)[0]) if done[0] else count
        if upto > shown:
          on_tokens([int(t) for t in jax.device_get(state.tokens[0, shown:upto])])
          shown = upto
      if done.all() or count >= max_new:
        break
      end = np.int32(min(count + step, max_new))
      state = self._block(leaves, state, end, key, knobs, self.allowed, stop_ids, mode=mode)
    tokens, reason, length = jax.device_get((state.tokens, state.reason, state.length))
    return [finish(tokens[b, :length[b]], STOP_REASONS[reason[b]], params.repeat_ngram)
            for b in range(tokens.shape[0])]

  def _generate_host(self, states, logits, params: SamplingParams, on_tokens) -> Generation:
    mode, knobs = mode_of(params), knobs_of(params)
    base_key = self._key(params.seed)
    repeat = RepeatStop(params.repeat_ngram)
    seen = jnp.zeros((1, self.padded_vocab if mode.penalty else 1), bool)
    sampled: list[int] = []
    token = self._first(logits, seen, jax.random.fold_in(base_key, 0), knobs, self.allowed,
                        mode)
    cache = states
    reason = "length"
    while True:
      value = int(jnp.reshape(token, (-1,))[0])  # the host needs it to check the stop rules
      sampled.append(value)
      if on_tokens is not None:
        on_tokens([value])
      if value in self.stop_ids:
        reason = "eos"
        break
      if repeat.push(value) and params.stop_on_repeat:
        reason = "repeat"
        break
      if len(sampled) >= params.max_new_tokens:
        break
      if mode.penalty:
        seen = self._mark(seen, jnp.reshape(token, (1,)))
      token, cache = self._advance(self._leaves(), cache, jnp.reshape(token, (1,)),
                                   seen, jax.random.fold_in(base_key, len(sampled)), knobs,
                                   self.allowed, mode)
    return finish(sampled, reason, params.repeat_ngram)
