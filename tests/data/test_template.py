"""The chat template on hand-written exchanges, with explicit expected id lists.

Word-level test vocabulary (conftest.py): <|endoftext|> 0, <|system|> 1, <|user|> 2,
<|assistant|> 3, <|frame|> 4, You 5, are 6, a 7, helpful 8, assistant 9, . 10, What 11,
colour 12, ? 13, It 14, is 15, red 16, blue 17, circle 18, square 19, Describe 20, the 21,
video 22, briefly 23, image 24, Then 25, moves 26, left 27.
"""

import json

import pytest

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.template import ChatTurn, render, render_prompt
from ma2mba_jax.data.tokenizer import (SpecialIds, load_tokenizer, special_ids,
                                       train_tokenizer, vocab_size)

# <|system|> You are a helpful assistant . <|endoftext|>
SYSTEM = [1, 5, 6, 7, 8, 9, 10, 0]
N = -1  # vision_index of a text position


def test_special_ids(word_tokenizer):
  assert special_ids(word_tokenizer) == SpecialIds(endoftext=0, system=1, user=2, assistant=3,
                                                   frame=4)


def test_one_exchange_with_frames(word_tokenizer):
  r = render([ChatTurn(2, "What colour?", "It is red.")], tokenizer=word_tokenizer,
             tokens_per_frame=3)
  assert r.tokens.tolist() == SYSTEM + [2, 4, 4, 4, 4, 4, 4, 11, 12, 13, 0,
                                        3, 14, 15, 16, 10, 0]
  assert r.loss_mask.astype(int).tolist() == [0] * 8 + [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                        0, 1, 1, 1, 1, 1]
  assert r.vision_index.tolist() == [N] * 8 + [N, 0, 1, 2, 3, 4, 5, N, N, N, N,
                                               N, N, N, N, N, N]
  assert r.turn_ends == [25] and r.turn_frames == [2] and r.num_frames == 2


def test_follow_up_questions_reuse_the_frames(word_tokenizer):
  """Stage 3: frames once, before the first question; every answer is labelled."""
  r = render([ChatTurn(1, "What colour?", "red."), ChatTurn(0, "What?", "circle.")],
             tokenizer=word_tokenizer, tokens_per_frame=2)
  assert r.tokens.tolist() == SYSTEM + [2, 4, 4, 11, 12, 13, 0, 3, 16, 10, 0,
                                        2, 11, 13, 0, 3, 18, 10, 0]
  assert r.loss_mask.astype(int).tolist() == [0] * 8 + [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                                                        0, 0, 0, 0, 0, 1, 1, 1]
  assert r.vision_index.tolist() == [N] * 8 + [N, 0, 1, N, N, N, N, N, N, N, N,
                                               N, N, N, N, N, N, N, N]
  assert r.turn_ends == [19, 27] and r.turn_frames == [1, 1]


def test_interleaved_clips_and_captions(word_tokenizer):
  """Stage 2: each clip's frames, then its caption; vision indices continue across clips."""
  r = render([ChatTurn(2, "", "a red circle."), ChatTurn(1, "", "Then a blue square.")],
             tokenizer=word_tokenizer, tokens_per_frame=2)
  assert r.tokens.tolist() == SYSTEM + [2, 4, 4, 4, 4, 0, 3, 7, 16, 18, 10, 0,
                                        2, 4, 4, 0, 3, 25, 7, 17, 19, 10, 0]
  assert r.loss_mask.astype(int).tolist() == [0] * 8 + [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
                                                        0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
  assert r.vision_index.tolist() == [N] * 8 + [N, 0, 1, 2, 3, N, N, N, N, N, N, N,
                                               N, 4, 5, N, N, N, N, N, N, N, N]
  cut = r.first_turns(1)
  assert cut.tokens.tolist() == r.tokens[:20].tolist() and cut.turn_frames == [2]


def test_generation_prompt_ends_after_assistant(word_tokenizer):
  r = render_prompt("What colour?", num_frames=1, tokenizer=word_tokenizer, tokens_per_frame=2)
  assert r.tokens.tolist() == SYSTEM + [2, 4, 4, 11, 12, 13, 0, 3]
  assert not r.loss_mask.any()
  history = [ChatTurn(1, "What colour?", "red.")]
  r = render_prompt("What?", num_frames=0, history=history, tokenizer=word_tokenizer,
                    tokens_per_frame=2)
  assert r.tokens.tolist() == SYSTEM + [2, 4, 4, 11, 12, 13, 0, 3, 16, 10, 0, 2, 11, 13, 0, 3]


def test_special_token_strings_in_text_stay_text(word_tokenizer):
  r = render([ChatTurn(0, "<|frame|>", "red.")], tokenizer=word_tokenizer, tokens_per_frame=2)
  assert 4 not in r.tokens.tolist()  # no vision placeholder came from the text


def test_missing_special_tokens_name_file_and_token(tmp_path, word_tokenizer_path):
  with open(word_tokenizer_path) as f:
    spec = json.load(f)
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|frame|>"]
  del spec["model"]["vocab"]["<|frame|>"]
  path = tmp_path / "no_frame.json"
  path.write_text(json.dumps(spec))
  with pytest.raises(DataError, match=f"{path}: tokenizer lacks .*<\\|frame\\|>"):
    load_tokenizer(str(path))
  tok = load_tokenizer(str(path), add_missing=True)
  assert special_ids(tok).frame == vocab_size(tok) - 1
  with pytest.raises(DataError, match="tokenizer file not found"):
    load_tokenizer(str(tmp_path / "nope.json"))


def test_trained_tokenizer_round_trips():
  tok = train_tokenizer(["A red circle moves left.", "What colour is the circle?"] * 3,
                        vocab_size=300)
  assert special_ids(tok) == SpecialIds(0, 1, 2, 3, 4)
  ids = tok.encode("A red circle, unseen words too!").ids
  assert tok.decode(ids) == "A red circle, unseen words too!"
