"""The paper's chat template (Table 5): token ids, loss mask and vision placeholders.

A sample is a system turn and one or more user -> assistant exchanges:

    <|system|>You are a helpful assistant.<|endoftext|>
    <|user|>[frame tokens of this turn's frames](user text)<|endoftext|>
    <|assistant|>(response)<|endoftext|>
    <|user|>(next question)<|endoftext|><|assistant|>(next response)<|endoftext|> ...

(no text between the pieces; the space and line breaks of the paper's table are layout.)
Frames always come at the start of a user turn, before its text. Each frame occupies
`tokens_per_frame` (K) consecutive positions holding the `<|frame|>` id.

Contract with the model, per sample of T tokens and F frames:
  tokens        int32 [T]  token ids; `<|frame|>` at vision positions.
  loss_mask     bool  [T]  True where token t is one the model must produce: every response
                           token and the `<|endoftext|>` that closes the response. The trainer
                           shifts: logits at t-1 are scored against tokens[t] with weight
                           loss_mask[t] (i.e. targets = tokens[1:], weights = loss_mask[1:]).
  vision_index  int32 [T]  f*K + k at the k-th position of frame f (an index into the sample's
                           vision tokens flattened to [F*K]); -1 at text positions.

Axis legend: T tokens, F frames, K tokens per frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tokenizers

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.tokenizer import special_ids

SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ChatTurn:
  """One user -> assistant exchange.

  num_frames: frames shown at the start of the user turn (before `user`).
  user: the user's text after the frames ('' for frames only).
  assistant: the response, the only part that is a label.
  """
  num_frames: int
  user: str
  assistant: str


@dataclasses.dataclass
class Rendered:
  """A tokenised sample (see the module docstring for the contract).

  tokens int32 [T], loss_mask bool [T], vision_index int32 [T].
  turn_ends[i]: number of tokens up to and including exchange i; turn_frames[i]: frames up
  to and including exchange i (both for cutting whole exchanges off the end).
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  vision_index: np.ndarray
  turn_ends: list[int]
  turn_frames: list[int]

  @property
  def num_frames(self) -> int:
    return self.turn_frames[-1] if self.turn_frames else 0

  def first_turns(self, count: int) -> Rendered:
    """The sample cut after its first `count` exchanges."""
    end = self.turn_ends[count - 1]
    return Rendered(self.tokens[:end], self.loss_mask[:end], self.vision_index[:end],
                    self.turn_ends[:count], self.turn_frames[:count])


def _encode_text(tokenizer: tokenizers.Tokenizer, text: str, special: set[int]) -> list[int]:
  ids = tokenizer.encode(text, add_special_tokens=False).ids if text else []
  if special.intersection(ids):
    raise DataError(
        f"text {text[:80]!r} encodes to a special token id of the chat template; the "
        "tokenizer's vocabulary maps plain text onto a special token")
  return ids


def render(
    turns: Sequence[ChatTurn],
    *,
    tokenizer: tokenizers.Tokenizer,
    tokens_per_frame: int,
    system_prompt: str = SYSTEM_PROMPT,
    open_last: bool = False,
) -> Rendered:
  """Renders exchanges with the chat template.

  With `open_last` (for generation) the last exchange stops right after `<|assistant|>`:
  its `assistant` text is ignored and nothing is labelled in it.
  """
  if not turns:
    raise ValueError("a sample needs at least one exchange")
  ids = special_ids(tokenizer)
  # Special-token strings inside data text must stay plain text. Set here, not only at
  # load time, because the flag does not survive pickling into data-loader workers.
  tokenizer.encode_special_tokens = True
  special = {ids.endoftext, ids.system, ids.user, ids.assistant, ids.frame}
  tokens: list[int] = []
  labels: list[bool] = []
  vision: list[int] = []

  def add(piece: list[int], *, label: bool = False) -> None:
    tokens.extend(piece)
    labels.extend([label] * len(piece))
    vision.extend([-1] * len(piece))

  add([ids.system] + _encode_text(tokenizer, system_prompt, special) + [ids.endoftext])
  turn_ends, turn_frames = [], []
  frames_so_far = 0
  for i, turn in enumerate(turns):
    if turn.num_frames < 0:
      raise ValueError(f"num_frames must be >= 0, got {turn.num_frames}")
    add([ids.user])
    count = turn.num_frames * tokens_per_frame
    first = frames_so_far * tokens_per_frame
    tokens.extend([ids.frame] * count)
    labels.extend([False] * count)
    vision.extend(range(first, first + count))
    frames_so_far += turn.num_frames
    add(_encode_text(tokenizer, turn.user, special) + [ids.endoftext, ids.assistant])
    if not (open_last and i == len(turns) - 1):
      add(_encode_text(tokenizer, turn.assistant, special) + [ids.endoftext], label=True)
    turn_ends.append(len(tokens))
    turn_frames.append(frames_so_far)
  return Rendered(
      tokens=np.asarray(tokens, dtype=np.int32),
      loss_mask=np.asarray(labels, dtype=bool),
      vision_index=np.asarray(vision, dtype=np.int32),
      turn_ends=turn_ends,
      turn_frames=turn_frames,
  )


def render_prompt(
    question: str,
    *,
    num_frames: int,
    tokenizer: tokenizers.Tokenizer,
    tokens_per_frame: int,
    history: Sequence[ChatTurn] = (),
    system_prompt: str = SYSTEM_PROMPT,
) -> Rendered:
  """A generation prompt: earlier exchanges, then `num_frames` frames + `question`, ending
  in `<|assistant|>`. (In the paper's layout the frames go with the first user turn: for a
  follow-up question put them in history[0] and pass num_frames=0.)"""
  last = ChatTurn(num_frames=num_frames, user=question, assistant="")
  return render([*history, last], tokenizer=tokenizer, tokens_per_frame=tokens_per_frame,
                system_prompt=system_prompt, open_last=True)
