"""The on-device decoding loop against the host loop (the reference) on the random tiny model,
and each sampling filter against a plain numpy version of it on fixed logits."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax import evaluate
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.infer.answering import (AnswerPrinter, ModelAnswerer, chat, make_sampler,
                                        stop_note)
from ma2mba_jax.infer.sample import (Knobs, SamplingParams, apply_repetition_penalty, choose,
                                     knobs_of, mode_of, sampling_keep)

QUESTIONS = ["What colour is the circle?", "Which shape is red?", "Which way does it move?"]
MAX_NEW = 24  # one buffer shape for every decode here (one compilation per mode)


@pytest.fixture(scope="module")
def convs(streamer):
  """Three questions asked after the same three random frames (the frames read once)."""
  frames = np.random.default_rng(0).integers(0, 256, (3, streamer.image_size,
                                                      streamer.image_size, 3), np.uint8)
  video = streamer.read_frames([frames], 3)
  return [streamer.ask(video, q) for q in QUESTIONS]


def _both(sampler, conv, params):
  host = sampler.generate(conv.states, conv.logits, params, decode_impl="host")
  device = sampler.generate(conv.states, conv.logits, params, decode_impl="device")
  return host, device


def test_greedy_device_loop_gives_the_host_loops_tokens(sampler, convs, monkeypatch):
  plain = SamplingParams(max_new_tokens=MAX_NEW)
  for conv in convs:
    host, device = _both(sampler, conv, plain)
    assert device == host
  # EOS: make a token the plain run drew (first seen at position k >= 3) the stop token;
  # both loops must stop right there, the stop token not in the answer.
  host, _ = _both(sampler, convs[0], plain)
  k = next(i for i in range(3, len(host.sampled)) if host.sampled[i] not in host.sampled[:i])
  monkeypatch.setattr(sampler, "stop_ids", frozenset({host.sampled[k]}))
  host_eos, device_eos = _both(sampler, convs[0], plain)
  assert host_eos.stop_reason == "eos" and host_eos.sampled == host.sampled[:k + 1]
  assert device_eos == host_eos
  monkeypatch.undo()
  # The paper's repeat stop: a repetition penalty below 1 makes drawn tokens likelier, so
  # greedy decoding falls into a loop; both loops stop after the same 5-token repeat.
  loop = SamplingParams(max_new_tokens=MAX_NEW, repetition_penalty=0.05)
  host, device = _both(sampler, convs[1], loop)
  assert host.stop_reason == "repeat" and len(host.sampled) < MAX_NEW
  assert host.tokens == host.sampled[:-5]
  assert device == host
  # A shorter n stops the plain greedy run of another question earlier (or not at all:
  # then both ran to the length limit).
  host, device = _both(sampler, convs[2], SamplingParams(max_new_tokens=MAX_NEW,
                                                         repeat_ngram=2))
  assert device == host


def test_batched_device_loop_gives_each_rows_host_tokens(sampler, convs):
  """Questions stacked on the batch axis, each row stopping on its own (with n = 2 the
  repeat rule stops the rows at different times), as each row decoded alone."""
  states = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *[c.states for c in convs])
  logits = jnp.stack([c.logits for c in convs])
  params = SamplingParams(max_new_tokens=MAX_NEW, repeat_ngram=2)
  device = sampler.generate_batch(states, logits, params)
  for conv, row in zip(convs, device, strict=True):
    assert row == sampler.generate(conv.states, conv.logits, params, decode_impl="host")
  assert len({len(g.sampled) for g in device}) > 1, "all rows stopped together: weak test"


def test_sampled_decoding_is_reproducible_per_seed_and_matches_the_host(sampler, convs):
  params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_k=40, top_p=0.95,
                          min_p=0.01, repetition_penalty=1.3, seed=3, stop_on_repeat=False)
  first = sampler.generate(convs[0].states, convs[0].logits, params)
  assert sampler.generate(convs[0].states, convs[0].logits, params) == first
  other = sampler.generate(convs[0].states, convs[0].logits,
                           SamplingParams(**{**params.__dict__, "seed": 4}))
  assert other.sampled != first.sampled
  host = sampler.generate(convs[0].states, convs[0].logits, params, decode_impl="host")
  assert host == first


def test_tokens_stream_as_they_come(sampler, convs):
  params = SamplingParams(max_new_tokens=MAX_NEW, stop_on_repeat=False)
  for impl, calls_at_least in (("device", 2), ("host", MAX_NEW // 2)):
    calls = []
    generation = sampler.generate(convs[0].states, convs[0].logits, params,
                                  on_tokens=calls.append, decode_impl=impl)
    assert [t for call in calls for t in call] == list(generation.sampled)
    assert len(calls) >= min(calls_at_least, len(generation.sampled)), impl


@pytest.mark.parametrize("k", [1, 5])
def test_tokens_per_iteration_change_no_answer(tiny_model, streamer, sampler, convs, k):
  """The default sampler decodes 4 tokens a loop iteration (the tests above); 1 and 5 (which
  divides neither the 8-token streaming blocks nor MAX_NEW) give the host loop's answers:
  a row stopped by EOS or the repeat rule mid-iteration, batched rows stopping apart, and
  streamed blocks (8 tokens, rounded up to 10 for k = 5)."""
  other = make_sampler(tiny_model, streamer, tokens_per_iteration=k)
  plain = SamplingParams(max_new_tokens=MAX_NEW)
  host = sampler.generate(convs[0].states, convs[0].logits, plain, decode_impl="host")
  eos_at = next(i for i in range(3, len(host.sampled)) if host.sampled[i] not in
                host.sampled[:i] and (i + 1) % 5)
  stop_ids = sampler.stop_ids
  other.stop_ids = sampler.stop_ids = frozenset({host.sampled[eos_at]})
  try:
    host_eos = sampler.generate(convs[0].states, convs[0].logits, plain, decode_impl="host")
    assert host_eos.stop_reason == "eos" and len(host_eos.sampled) == eos_at + 1
    assert other.generate(convs[0].states, convs[0].logits, plain) == host_eos
  finally:
    sampler.stop_ids = other.stop_ids = stop_ids
  states = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *[c.states for c in convs])
  logits = jnp.stack([c.logits for c in convs])
  params = SamplingParams(max_new_tokens=MAX_NEW, repeat_ngram=2)
  rows = other.generate_batch(states, logits, params)
  assert rows == sampler.generate_batch(states, logits, params, decode_impl="host")
  assert len({len(g.sampled) for g in rows}) > 1
  calls = []
  streamed = other.generate(convs[1].states, convs[1].logits,
                            SamplingParams(max_new_tokens=MAX_NEW, stop_on_repeat=False),
                            on_tokens=calls.append)
  assert [t for call in calls for t in call] == list(streamed.sampled)
  assert len(streamed.sampled) == MAX_NEW
  # the first token (drawn from the prompt's logits) comes alone, then a block a call
  assert [len(c) for c in calls] == ([1, 8, 8, 7] if k == 1 else [1, 10, 10, 3])


# --------------------------------------------------------------------------- the filters


def _np_keep(logits, top_k=0, top_p=1.0, min_p=0.0):
  """numpy: which ids top_k, then top_p over what top_k left, then min_p keep."""
  keep = np.isfinite(logits)
  if top_k:
    kth = np.sort(logits[keep])[::-1][min(top_k, keep.sum()) - 1]
    keep &= logits >= kth
  if top_p < 1:
    masked = np.where(keep, logits, -np.inf)
    probs = np.exp(masked - masked.max())
    probs /= probs.sum()
    order = np.argsort(-masked, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    keep &= nucleus
  if min_p > 0:
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    keep &= probs >= min_p * probs.max()
  return keep


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (5, 1.0, 0.0), (1, 1.0, 0.0), (0, 0.6, 0.0), (0, 1e-6, 0.0), (0, 1.0, 0.1),
    (0, 1.0, 1.0), (8, 0.5, 0.0), (12, 0.8, 0.05), (60, 0.9, 0.0),
])
def test_filters_match_numpy(top_k, top_p, min_p):
  rng = np.random.default_rng(7)
  logits = (2.0 * rng.standard_normal(50)).astype(np.float32)
  logits[[3, 17]] = -np.inf  # disallowed ids
  params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
  keep = np.asarray(sampling_keep(jnp.asarray(logits), knobs_of(params), mode_of(params)))
  expected = _np_keep(logits, top_k, top_p, min_p)
  np.testing.assert_array_equal(keep, expected)
  assert expected.sum() >= 1 and not keep[[3, 17]].any()


def test_repetition_penalty_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 30)).astype(np.float32)
  seen = rng.random((2, 30)) < 0.3
  for penalty in (1.5, 0.5):
    expected = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
    np.testing.assert_allclose(np.asarray(apply_repetition_penalty(
        jnp.asarray(logits), jnp.asarray(seen), jnp.float32(penalty))), expected, rtol=1e-6)
  # Greedy with the penalty: the argmax moves off a seen id exactly as numpy's does.
  logits = np.asarray([[2.0, 1.9, -1.0, 0.5]], np.float32)
  seen = np.asarray([[True, False, False, False]])
  allowed = jnp.ones((4,), bool)
  params = SamplingParams(repetition_penalty=1.2)
  token = choose(jnp.asarray(logits), allowed, jnp.asarray(seen), jax.random.key(0),
                 knobs_of(params), mode_of(params))
  assert int(token[0]) == 1  # 2.0 / 1.2 < 1.9
  assert int(choose(jnp.asarray(logits), allowed, jnp.asarray(seen), jax.random.key(0),
                    knobs_of(SamplingParams()), mode_of(SamplingParams()))[0]) == 0


def test_sampling_draws_only_and_all_of_the_kept_ids():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((1, 40)).astype(np.float32)
  allowed = np.ones(40, bool)
  allowed[int(np.argmax(logits))] = False  # the most likely id is banned
  params = SamplingParams(temperature=2.0, top_k=6, top_p=0.6)
  knobs, mode = knobs_of(params), mode_of(params)
  assert isinstance(knobs, Knobs)
  draw = jax.jit(jax.vmap(lambda key: choose(jnp.asarray(logits), jnp.asarray(allowed),
                                             jnp.zeros((1, 1), bool), key, knobs, mode)[0]))
  drawn = set(np.asarray(draw(jax.random.split(jax.random.key(0), 2000))).tolist())
  masked = np.where(allowed, logits[0], -np.inf) / 2.0
  expected = set(np.flatnonzero(_np_keep(masked, top_k=6, top_p=0.6)).tolist())
  assert drawn == expected and 2 <= len(expected) < 6


class _Recorder(io.StringIO):
  """A text stream that remembers each write."""

  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, text):
    self.writes.append(text)
    return super().write(text)


@pytest.mark.parametrize("params, pieces", [
    (SamplingParams(max_new_tokens=MAX_NEW), True),
    (SamplingParams(max_new_tokens=MAX_NEW, repetition_penalty=0.05), False),  # repeat stops
])
def test_chat_streams_answers_and_prints_what_it_printed_before(streamer, sampler, video,
                                                                params, pieces):
  """chat(out=...) writes each answer in pieces as it is decoded; the text in the end is
  what generate printed before streaming: 'Q: ...\\nA: answer[  [stopped: why]]' a turn."""
  out = _Recorder()
  turns = chat(streamer, sampler, video, QUESTIONS[:2], sampling=params, out=out)
  expected = "".join(f"Q: {t.question}\nA: {t.answer}{stop_note(t.generation)}\n"
                     for t in turns)
  assert out.getvalue() == expected
  assert {t.generation.stop_reason for t in turns} <= {"length", "repeat", "eos"}
  answer_writes = [w for w in out.writes if w and not w.startswith(("Q: ", "  [", "\n"))]
  if pieces:  # answers of MAX_NEW tokens come in several blocks of 8
    assert all(len(t.generation.sampled) > 16 for t in turns)
    assert len(answer_writes) > len(turns), "answers were not streamed in pieces"


def test_answer_printer_holds_back_what_may_be_trimmed(tokenizer):
  ids = tokenizer.encode("A red circle moves left on a black background.").ids
  assert len(ids) > 7
  out = io.StringIO()
  printer = AnswerPrinter(tokenizer, out, hold=5)
  for token in ids:
    printer.push([token])
    assert tokenizer.decode(ids).startswith(out.getvalue())
    assert len(out.getvalue()) <= len(tokenizer.decode(ids[:-5]))
  kept = tokenizer.decode(ids[:-5])  # a repeat stop trims the last 5 tokens
  assert out.getvalue() == kept
  printer.finish(kept)
  assert out.getvalue() == kept


def _synthetic_set(root, video):
  """A synthetic-layout set (manifest.json -> eval/videomme.json, eval/videos): 3 questions
  about one video, 2 about another (the same file copied), 4 options each."""
  videos = root / "eval" / "videos"
  videos.mkdir(parents=True)
  for name in ("synth_001", "synth_002"):
    shutil.copy(video, videos / f"{name}.mp4")
  options = ["A. red", "B. blue", "C. green", "D. yellow"]
  questions = [("001-1", "synth_001", "What colour is the circle?", "A"),
               ("001-2", "synth_001", "Which shape is red?", "C"),
               ("001-3", "synth_001", "Which way does it move?", "B"),
               ("002-1", "synth_002", "What colour is the circle?", "D"),
               ("002-2", "synth_002", "Which way does it move?", "A")]
  records = [{"video_id": qid.split("-")[0], "videoID": vid, "duration": "short",
              "question_id": qid, "task_type": "colour", "question": q, "options": options,
              "answer": a} for qid, vid, q, a in questions]
  (root / "eval" / "videomme.json").write_text(json.dumps(records))
  (root / "manifest.json").write_text(json.dumps({"eval": {
      "annotations": "eval/videomme.json", "video_root": "eval/videos"}}))
  return str(root)


@pytest.mark.parametrize("target", ["text", "letter"])
def test_batched_evaluation_gives_the_per_question_scores(streamer, sampler, video, tmp_path,
                                                          target):
  """evaluate on the synthetic layout: one video's questions read, scored and decoded as
  batches == one question at a time (same generated texts and choices, same likelihood
  choices and scores, same table)."""
  data = _synthetic_set(tmp_path / "data", video)
  reports = {}
  for batch in (False, True):
    answerer = ModelAnswerer(streamer, sampler, target=target, mc_max_new_tokens=MAX_NEW,
                             batch=batch)
    reports[batch] = evaluate.run("synthetic", data, answerer=answerer,
                                  json_path=str(tmp_path / f"{target}_{batch}.json"))
  single, batched = reports[False], reports[True]
  assert batched["rows"] == single["rows"]
  assert len(batched["records"]) == 5
  for one, many in zip(single["records"], batched["records"], strict=True):
    assert many["generate"] == one["generate"]
    assert many["likelihood"]["choice"] == one["likelihood"]["choice"]
    # Batched, the questions and options are rows of one matmul (batch R, not 1), which
    # may round differently: 1.9e-6 (7e-8 relative, about 1 f32 ulp of the sum) was the
    # largest difference over these 40 scores (5 questions x 4 options x 2 targets);
    # rel=1e-6 is 8 ulps. Not a seed sweep: each seed is a new model to compile.
    for letter, score in one["likelihood"]["scores"].items():
      assert many["likelihood"]["scores"][letter]["sum"] == pytest.approx(score["sum"],
                                                                           rel=1e-6)
  assert len({r["generate"]["text"] for r in batched["records"]}) > 1, "all answers alike"
  # The records file of the batched run resumes as before: nothing is asked again.
  again = ModelAnswerer(streamer, sampler, target=target, batch=True)
  assert evaluate.run("synthetic", data, answerer=again, json_path=str(
      tmp_path / f"{target}_True.json"))["records"] == batched["records"]


def test_the_next_video_is_decoded_ahead_with_the_same_answers(streamer, sampler, video,
                                                               tmp_path, monkeypatch):
  """evaluate with decode_ahead (the default): the second video's decoding starts before
  the first video's questions are asked, and every record equals decoding inline; a bad
  second video fails at its own turn, after the first video's answers are kept."""
  data = _synthetic_set(tmp_path / "data", video)
  events = []
  video_frames, read_video, ask_many = (streamer.video_frames, streamer.read_video,
                                        streamer.ask_many)
  name = lambda v: os.path.basename(v if isinstance(v, str) else v.path)
  monkeypatch.setattr(streamer, "video_frames", lambda path, **kw: (
      events.append(("decode", name(path))) or video_frames(path, **kw)))
  monkeypatch.setattr(streamer, "read_video", lambda v, **kw: (
      events.append(("read", name(v))) or read_video(v, **kw)))
  monkeypatch.setattr(streamer, "ask_many", lambda *a, **kw: (
      events.append(("ask", None)) or ask_many(*a, **kw)))
  reports = {}
  for ahead in (True, False):
    monkeypatch.setattr(streamer, "decode_ahead", ahead)
    events.clear()
    answerer = ModelAnswerer(streamer, sampler, target="text", mc_max_new_tokens=MAX_NEW)
    reports[ahead] = evaluate.run("synthetic", data, answerer=answerer)
    if ahead:
      assert events[:4] == [("decode", "synth_001.mp4"), ("read", "synth_001.mp4"),
                            ("decode", "synth_002.mp4"), ("ask", None)], events
      assert answerer._ahead is None  # closed at the end
    else:
      assert events.index(("decode", "synth_002.mp4")) > events.index(("ask", None))
  assert reports[True]["records"] == reports[False]["records"]
  # The second video corrupt: the first one's three answers are kept, the error names it.
  bad = tmp_path / "data" / "eval" / "videos" / "synth_002.mp4"
  bad.write_bytes(b"\x00" * 1000)
  monkeypatch.setattr(streamer, "decode_ahead", True)
  records = str(tmp_path / "answers.jsonl")
  with pytest.raises(DataError, match=f"{bad}: cannot open video"):
    evaluate.run("synthetic", data, records_path=records,
                 answerer=ModelAnswerer(streamer, sampler, target="text",
                                        mc_max_new_tokens=MAX_NEW))
  with open(records) as f:
    kept = [json.loads(line) for line in f][1:]
  assert [r["question_id"] for r in kept] == ["001-1", "001-2", "001-3"]
  assert kept == reports[False]["records"][:3]
