"""Answering questions about videos with a model: chats (generate.py) and benchmark
questions (evaluate.py), on top of the streaming prefill and the sampler.

A video is read once per call: every question about it continues from the state after the
frames (the paper's layout puts the frames before the first question, so the state there is
shared, never recomputed), and every multiple-choice option is scored from a copy of the
state after its question. With `batch` (the default) one video's questions are read
together (Streamer.ask_many: the text past each question's whole chunks in one recurrent
call over all questions), all their options are scored in a few calls
(Streamer.token_logprobs_rows: the states after each question stacked on the batch axis)
and their answers decoded together, one batch row per question (Sampler.generate_batch,
the batch padded to a power of two so few shapes compile); batch=False asks, scores and
decodes one question at a time (the reference: the same choices and answers), batch_text=
False only decodes together (as before issue 19).

Option likelihood, two targets:
  letter  (the default) the question is asked with its options and the Video-MME instruction,
          and each option is scored as the answer "B": what that instruction asks for;
  text    a cloze test: the question is asked alone, without the options, and each option's
          text ("a red circle") is scored as the answer -- the model never has to map what
          it saw to a letter, only to say it (as lm-evaluation-harness scores multiple
          choice).
A target is followed by `<|endoftext|>`. Options are ranked by the MEAN log-probability per
target token (so option texts of different lengths compare fairly); the sums and token
counts are kept too.

Generation, two methods:
  generate       greedy decoding after the multiple-choice prompt (options and the
                 Video-MME instruction), the choice parsed from the text (evals.parse_choice:
                 the option letter, failing that an option's whole text) -- Video-MME's own
                 protocol;
  generate_text  greedy decoding after the question alone, without the options; the answer
                 must name exactly one option's text (`match_option_text`: the whole answer,
                 or as words inside it, case, punctuation and articles ignored), else it
                 counts as wrong. The model is never shown the options, so a guess can only
                 lose against chance. The generation counterpart of target 'text'.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from ma2mba_jax.data.formats import format_multiple_choice
from ma2mba_jax.data.tokenizer import vocab_size
from ma2mba_jax.evals import MCItem, OpenItem, normalize_answer, parse_choice
from ma2mba_jax.infer.sample import Generation, Sampler, SamplingParams
from ma2mba_jax.infer.stream import Conversation, Progress, Streamer, encode_text
from ma2mba_jax.models.video_lm import VideoMa2mba

if TYPE_CHECKING:
  from ma2mba_jax.data.video_prefetch import VideoFrames

METHODS = ("likelihood", "generate")  # evaluate.py's --method=both
MC_METHODS = (*METHODS, "generate_text")  # every method answer_mc knows
TARGETS = ("letter", "text")


@dataclasses.dataclass(frozen=True)
class Turn:
  """One question of a chat and its answer."""
  question: str
  answer: str
  generation: Generation


def make_sampler(model: VideoMa2mba, streamer: Streamer, **kwargs) -> Sampler:
  """A Sampler that stops at `<|endoftext|>` and never emits `<|frame|>` (kwargs: Sampler's
  decode_impl, block_tokens)."""
  return Sampler(model.llm, vocab_size=vocab_size(streamer.tokenizer),
                 stop_ids=(streamer.ids.endoftext,), banned_ids=(streamer.ids.frame,),
                 **kwargs)


def match_option_text(text: str, item: MCItem) -> str | None:
  """The letter of the one option whose text a free answer names: the answer equals it, or
  contains it as whole words (case, punctuation and the articles a/an/the ignored); None
  when it names none or more than one ("a blue diamond" names "blue" among colours)."""
  said = normalize_answer(text)
  if not said:
    return None
  texts = {letter: normalize_answer(item.option_text(letter)) for letter in item.letters}
  equal = [letter for letter, option in texts.items() if option and option == said]
  if equal:
    return equal[0] if len(equal) == 1 else None
  words = f" {said} "
  named = [letter for letter, option in texts.items() if option and f" {option} " in words]
  return named[0] if len(named) == 1 else None


def stop_note(generation: Generation) -> str:
  """What follows a printed answer: nothing after an EOS, else why it stopped."""
  return "" if generation.stop_reason == "eos" else f"  [stopped: {generation.stop_reason}]"


class AnswerPrinter:
  """Writes an answer's text to `out` as its tokens come (`push`), then the rest (`finish`).

  The last `hold` tokens drawn are not shown yet: the stop token and a repeat the stop rule
  trims off are never part of the answer. Text ending in an incomplete character waits for
  the next token. So what is written in the end is exactly the decoded answer.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, out: TextIO, hold: int):
    self.tokenizer, self.out, self.hold = tokenizer, out, hold
    self.tokens: list[int] = []
    self.shown = ""

  def push(self, tokens: Sequence[int]) -> None:
    self.tokens.extend(int(t) for t in tokens)
    safe = self.tokens[:max(len(self.tokens) - self.hold, 0)]
    text = self.tokenizer.decode(safe) if safe else ""
    if text.startswith(self.shown) and not text.endswith("\ufffd") and len(text) > len(
        self.shown):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def finish(self, answer: str) -> None:
    """Writes what of the final answer is not shown yet."""
    rest = answer[len(self.shown):] if answer.startswith(self.shown) else "\n" + answer
    self.out.write(rest)
    self.out.flush()


def chat(streamer: Streamer, sampler: Sampler, video: str, questions: Sequence[str], *,
         sampling: SamplingParams = SamplingParams(), fps: float = 1.0,
         max_frames: int | None = None, progress: Progress | None = None,
         out: TextIO | None = None) -> list[Turn]:
  """Reads the video, then answers the questions in turn, each follow-up continuing the
  running state after the previous answer (`answer<|endoftext|><|user|>question...`).

  out: if given, each turn is written there as it is decoded, the answer streamed token by
  token (`Q: question`, `A: answer` and the stop note of a turn that did not end with EOS).
  """
  conv = streamer.read_video(video, fps=fps, max_frames=max_frames, progress=progress)
  turns = []
  hold = max(sampling.repeat_ngram if sampling.stop_on_repeat else 0, 1)
  for question in questions:
    conv = streamer.ask(conv, question)
    printer = None
    if out is not None:
      out.write(f"Q: {question}\nA: ")
      out.flush()
      printer = AnswerPrinter(streamer.tokenizer, out, hold)
    generation = sampler.generate(conv.states, conv.logits, sampling,
                                  on_tokens=printer.push if printer else None)
    conv = streamer.add_answer(conv, generation.tokens)
    turn = Turn(question, streamer.tokenizer.decode(list(generation.tokens)), generation)
    if printer is not None:
      printer.finish(turn.answer)
      out.write(stop_note(generation) + "\n")
      out.flush()
    turns.append(turn)
  return turns


def progress_printer(label: str, stream=sys.stderr) -> Progress:
  """progress(done, total) printing 'label: done/total frames (x%), r frames/s' in place."""
  start = time.perf_counter()

  def report(done: int, total: int) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    end = "\n" if done >= total else ""
    stream.write(f"\r{label}: {done}/{total} frames ({100.0 * done / total:.0f}%), "
                 f"{rate:.1f} frames/s{end}")
    stream.flush()
  return report


class ModelAnswerer:
  """Answers benchmark questions with a VideoMa2mba (the `Answerer` evaluate.py calls).

  methods for multiple choice (MC_METHODS): 'likelihood', 'generate' and 'generate_text'
  (see the module docstring).
  """

  def __init__(self, streamer: Streamer, sampler: Sampler, *, fps: float = 1.0,
               max_frames: int | None = None, target: str = "letter",
               mc_max_new_tokens: int = 8, open_max_new_tokens: int = 64,
               progress: Callable[[str], Progress] | None = None, batch: bool = True,
               batch_text: bool | None = None):
    if target not in TARGETS:
      raise ValueError(f"likelihood target must be one of {TARGETS}, got {target!r}")
    self.streamer, self.sampler = streamer, sampler
    self.fps, self.max_frames, self.target = fps, max_frames, target
    self.mc_sampling = SamplingParams(max_new_tokens=mc_max_new_tokens)
    self.open_sampling = SamplingParams(max_new_tokens=open_max_new_tokens)
    self.progress = progress
    self.batch = batch
    # Read and score one video's questions together (None: as `batch`); False with batch
    # True is the evaluation before issue 19 (only the answers decoded together).
    self.batch_text = batch if batch_text is None else batch_text
    # Evaluation's video order (upcoming) and the next video, decoding in the background.
    self._next_video: dict[str, str] = {}
    self._ahead: VideoFrames | None = None

  @classmethod
  def create(cls, model: VideoMa2mba, tokenizer: tokenizers.Tokenizer, *,
             frames_per_step: int = 16, **kwargs) -> ModelAnswerer:
    """A Streamer and Sampler for the model, then the answerer (kwargs as __init__)."""
    streamer = Streamer(model, tokenizer, frames_per_step=frames_per_step)
    return cls(streamer, make_sampler(model, streamer), **kwargs)

  def upcoming(self, videos: Sequence[str]) -> None:
    """The videos evaluation reads, in order: while one is answered, the next one's first
    frames are decoded in the background (at most 8 batches of M waiting)."""
    self._next_video = dict(zip(videos[:-1], videos[1:]))

  def close(self) -> None:
    """Stops a decoding ahead that no read will take."""
    if self._ahead is not None:
      self._ahead.close()
      self._ahead = None

  def _frames(self, video: str) -> VideoFrames:
    return self.streamer.video_frames(video, fps=self.fps, max_frames=self.max_frames)

  def _read(self, video: str) -> Conversation:
    progress = self.progress(video) if self.progress else None
    ahead, self._ahead = self._ahead, None
    if ahead is not None and ahead.path != video:  # answered out of the announced order
      ahead.close()
      ahead = None
    conv = self.streamer.read_video(ahead or self._frames(video), progress=progress)
    if self.streamer.decode_ahead and video in self._next_video:
      # decoded while this video's questions are answered
      self._ahead = self._frames(self._next_video[video])
    return conv

  def _generate(self, conv: Conversation, sampling: SamplingParams) -> str:
    generation = self.sampler.generate(conv.states, conv.logits, sampling)
    return self.streamer.tokenizer.decode(list(generation.tokens))

  def _generate_all(self, convs: Sequence[Conversation], sampling: SamplingParams
                    ) -> list[str]:
    """The answers after each conversation: one batch (self.batch) or one at a time."""
    if not self.batch or len(convs) == 1:
      return [self._generate(conv, sampling) for conv in convs]
    rows = 1 << (len(convs) - 1).bit_length()  # padded with copies of the first row
    padded = list(convs) + [convs[0]] * (rows - len(convs))
    states = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *[c.states for c in padded])
    logits = jnp.stack([jnp.reshape(c.logits, (-1,)) for c in padded])
    generations = self.sampler.generate_batch(states, logits, sampling)[:len(convs)]
    return [self.streamer.tokenizer.decode(list(g.tokens)) for g in generations]

  def _targets(self, item: MCItem) -> list[list[int]]:
    """The token ids scored for each option of the item (see the module docstring)."""
    return [encode_text(self.streamer.tokenizer,
                        letter if self.target == "letter" else item.option_text(letter),
                        self.streamer.ids) + [self.streamer.ids.endoftext]
            for letter in item.letters]

  @staticmethod
  def _scores(item: MCItem, logprobs: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    scores = {}
    for letter, row in zip(item.letters, logprobs, strict=True):
      total = float(row.sum())
      scores[letter] = {"sum": total, "n": len(row), "mean": total / len(row)}
    return scores

  def option_scores(self, conv: Conversation, item: MCItem) -> dict[str, dict[str, float]]:
    """Per letter: {"sum": total log-prob, "n": target tokens, "mean": sum / n}."""
    return self._scores(item, [self.streamer.token_logprobs(conv, ids)
                               for ids in self._targets(item)])

  def _ask_all(self, video_conv: Conversation, prompts: Sequence[str]
               ) -> list[Conversation]:
    """Each prompt asked after the video: together (self.batch) or one at a time."""
    if self.batch_text and len(prompts) > 1:
      return self.streamer.ask_many(video_conv, prompts)
    return [self.streamer.ask(video_conv, prompt) for prompt in prompts]

  def answer_mc(self, video: str, items: Sequence[MCItem], methods: Sequence[str]
                ) -> list[dict[str, Any]]:
    """Per item: {"likelihood": {"choice", "scores"}}, {"generate": {"text", "choice"}}
    and/or {"generate_text": {"text", "choice"}} (MC_METHODS), choices being letters (None
    when the generated text names no option)."""
    unknown = sorted(set(methods) - set(MC_METHODS))
    if unknown:
      raise ValueError(f"unknown multiple-choice methods {unknown}; known: {MC_METHODS}")
    video_conv = self._read(video)
    out: list[dict[str, Any]] = [{} for _ in items]
    # The multiple-choice prompt / the question alone after the video, when needed.
    mc_convs = bare_convs = [None] * len(items)
    if "generate" in methods or ("likelihood" in methods and self.target == "letter"):
      mc_convs = self._ask_all(video_conv, [format_multiple_choice(item.question, item.options)
                                            for item in items])
    if "generate_text" in methods or ("likelihood" in methods and self.target == "text"):
      bare_convs = self._ask_all(video_conv, [item.question for item in items])
    if "likelihood" in methods:
      scored = mc_convs if self.target == "letter" else bare_convs
      targets = [self._targets(item) for item in items]
      if self.batch_text:
        logprobs = self.streamer.token_logprobs_rows(scored, targets)
      else:
        logprobs = [[self.streamer.token_logprobs(conv, ids) for ids in rows]
                    for conv, rows in zip(scored, targets, strict=True)]
      for item, result, rows in zip(items, out, logprobs, strict=True):
        scores = self._scores(item, rows)
        result["likelihood"] = {"choice": max(scores, key=lambda k: scores[k]["mean"]),
                                "scores": scores}
    for method, convs, parse in (("generate", mc_convs, parse_choice),
                                 ("generate_text", bare_convs, match_option_text)):
      if method in methods:
        texts = self._generate_all(convs, self.mc_sampling)
        for item, result, text in zip(items, out, texts, strict=True):
          result[method] = {"text": text, "choice": parse(text, item)}
    return out

  def answer_open(self, video: str, items: Sequence[OpenItem]) -> list[str]:
    """Greedy answers to open-ended questions about one video."""
    video_conv = self._read(video)
    return self._generate_all(self._ask_all(video_conv, [item.question for item in items]),
                              self.open_sampling)
