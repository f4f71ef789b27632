"""The `generate_text` method: the question asked alone, the free answer matched to the
one option whose text it names (infer/answering.py `match_option_text`)."""

from ma2mba_jax.evals import MCItem
from ma2mba_jax.infer.answering import ModelAnswerer, match_option_text

COLOURS = ("A. red", "B. blue", "C. dark green", "D. green")


def _item(options=COLOURS, video="v.mp4"):
  return MCItem("q", video, "What colour is the circle?", tuple(options), "B", "short")


def test_match_option_text():
  item = _item()
  assert match_option_text("blue", item) == "B"
  assert match_option_text(" Blue.", item) == "B"
  assert match_option_text("A blue circle.", item) == "B"  # the article "A" is no letter
  assert match_option_text("the dark green one", item) is None  # names C and D
  assert match_option_text("dark green", item) == "C"  # equal to one option: that one
  assert match_option_text("red or blue", item) is None
  assert match_option_text("purple", item) is None
  assert match_option_text("", item) is None
  assert match_option_text("B", item) is None  # a letter is not an option's text


def test_generate_text_is_greedy_decoding_after_the_bare_question(streamer, sampler, video):
  answerer = ModelAnswerer(streamer, sampler, mc_max_new_tokens=4)
  item = _item(video=video)
  (result,) = answerer.answer_mc(video, [item], ("generate_text",))
  conv = streamer.ask(streamer.read_video(video), item.question)
  generation = sampler.generate(conv.states, conv.logits, answerer.mc_sampling)
  text = streamer.tokenizer.decode(list(generation.tokens))
  assert result == {"generate_text": {"text": text, "choice": match_option_text(text, item)}}
