"""Recurrent decoding from the LM's states: greedy or sampled, with the paper's stop rule.

    sampler = Sampler(model.llm, vocab_size=tokenizer_vocab, stop_ids=(eot,), banned_ids=(frame,))
    generation = sampler.generate(conv.states, conv.logits, SamplingParams(temperature=0.0))

One token costs one call of a jitted function of fixed shape (`Mamba2LM.step` followed by
the choice of the next token), compiled once per Sampler; the state is the only memory.

Choosing a token from the logits [V]:
  * ids >= vocab_size (the embedding's padding rows) and `banned_ids` (e.g. `<|frame|>`,
    which is never a target in training) get probability 0;
  * temperature 0: greedy (argmax);
  * temperature > 0: softmax(logits / temperature), cut to the smallest set of most likely
    tokens whose probability reaches top_p (nucleus; top_p=1 keeps all), then drawn with the
    key fold_in(key(seed), i) for the i-th generated token, so a seed gives the same text.

Stopping, checked after every token, first match wins:
  * 'eos':    the token is one of `stop_ids` (`<|endoftext|>`); it is not part of the answer;
  * 'repeat': the paper's rule. With n = 5: the last n generated tokens, as a sequence, equal
              n consecutive generated tokens that start earlier (windows may overlap the last
              n). Only the generated tokens are compared, never the prompt, so an answer may
              quote the question. The last n tokens (the repeat) are trimmed off the answer;
              the earlier occurrence stays;
  * 'length': max_new_tokens tokens were generated.

Axis legend: B batch (1 here), V (padded) vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ma2mba_jax.models.mamba2 import LayerStates, Mamba2LM

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to decode one answer."""
  # Most tokens to generate (the stop token included).
  max_new_tokens: int = 256
  # 0: greedy; > 0: sample from softmax(logits / temperature).
  temperature: float = 0.0
  # Nucleus sampling: keep the most likely tokens up to this much probability (1: all).
  top_p: float = 1.0
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


def choose_token(logits: Array, allowed: Array, key: Array, temperature: Array,
                 top_p: Array) -> Array:
  """logits [V] f32 -> int32 token id: greedy when temperature == 0, else nucleus sampling."""
  logits = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
  greedy = jnp.argmax(logits)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sampled = jax.random.categorical(key, top_p_filter(scaled, top_p))
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# --------------------------------------------------------------------------- the sampler


class Sampler:
  """Decodes from LayerStates with `Mamba2LM.step`, one jitted call per token.

  vocab_size: the tokenizer's id count (padding rows beyond it are never chosen).
  stop_ids: ids that end the answer (`<|endoftext|>`); banned_ids: ids never chosen.
  """

  def __init__(self, llm: Mamba2LM, *, vocab_size: int, stop_ids: Sequence[int] = (),
               banned_ids: Sequence[int] = ()):
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self.allowed = vocab_mask(llm.config.padded_vocab_size, vocab_size, banned_ids)
    graphdef, params = nnx.split(llm)
    self._params = params

    def first(logits, key, temperature, top_p, allowed):
      """The first answer token, from the prompt's last logits [V]."""
      return choose_token(logits, allowed, key, temperature, top_p)

    def advance(params, cache, token, key, temperature, top_p, allowed):
      """token int32 [] -> (next token int32 [], cache): one step of the LM, one choice."""
      model = nnx.merge(graphdef, params)
      logits, cache = model.step(token[None], cache)              # [1, V]
      return choose_token(logits[0], allowed, key, temperature, top_p), cache

    self._first = jax.jit(first)
    self._advance = jax.jit(advance)

  def generate(self, states: LayerStates, logits: Array,
               params: SamplingParams = SamplingParams()) -> Generation:
    """Decodes an answer after a prompt.

    states: the LayerStates after the prompt (batch 1; left untouched, so the same prompt
      state can be decoded from again). logits: [V] (or [1, V]) next-token logits after the
      prompt's last token.
    """
    logits = jnp.reshape(logits, (-1,))
    base_key = jax.random.key(params.seed)
    temperature = jnp.float32(params.temperature)
    top_p = jnp.float32(params.top_p)
    repeat = RepeatStop(params.repeat_ngram)
    sampled: list[int] = []
    token = self._first(logits, jax.random.fold_in(base_key, 0), temperature, top_p,
                        self.allowed)
    cache = states
    reason = "length"
    while True:
      value = int(token)  # the host needs it to check the stop rules
      sampled.append(value)
      if value in self.stop_ids:
        reason = "eos"
        break
      if repeat.push(value) and params.stop_on_repeat:
        reason = "repeat"
        break
      if len(sampled) >= params.max_new_tokens:
        break
      token, cache = self._advance(self._params, cache, token,
                                   jax.random.fold_in(base_key, len(sampled)), temperature,
                                   top_p, self.allowed)
    answer = sampled
    if reason == "eos":
      answer = sampled[:-1]
    elif reason == "repeat":
      answer = sampled[:-params.repeat_ngram]
    return Generation(tokens=tuple(answer), sampled=tuple(sampled), stop_reason=reason)
