"""The evaluator on hand-made annotation files with stub answerers (known choices, one wrong),
the readers' errors, answer parsing and F1; then the real answerer and checkpoint loading on
the random tiny model."""

import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax import evals, evaluate
from ma2mba_jax.convert.io import save_model
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.evals import MCItem, exact_match, parse_choice, token_f1
from ma2mba_jax.infer import checkpoint
from ma2mba_jax.infer.answering import ModelAnswerer
from tests.plugins import plugin_folder

OPTIONS = ["A. red", "B. blue", "C. green", "D. yellow"]


class StubAnswerer:
  """Answers from a table: question_id -> (likelihood letter, generated text); a video in
  `bad` fails as an unreadable file does (DataError naming it)."""

  def __init__(self, table, bad=()):
    self.table, self.videos, self.bad, self.asked = table, [], set(bad), []

  def answer_mc(self, video, items, methods):
    self.videos.append(os.path.basename(video))
    if os.path.basename(video) in self.bad:
      raise DataError(f"{video}: cannot open video (Invalid data found)")
    self.asked.extend(item.question_id for item in items)
    out = []
    for item in items:
      letter, text = self.table[item.question_id]
      result = {}
      if "likelihood" in methods:
        result["likelihood"] = {"choice": letter, "scores": {}}
      if "generate" in methods:
        result["generate"] = {"text": text, "choice": parse_choice(text, item)}
      out.append(result)
    return out

  def answer_open(self, video, items):
    self.videos.append(os.path.basename(video))
    return [self.table[item.question_id] for item in items]


def _touch_videos(root, *names):
  os.makedirs(root, exist_ok=True)
  for name in names:
    with open(os.path.join(root, name), "wb") as f:
      f.write(b"stub")  # the stub answerers never open them; readers check they exist


def _videomme_record(qid, video, duration, answer, options=OPTIONS):
  return {"video_id": qid.split("-")[0], "videoID": video, "duration": duration,
          "question_id": qid, "task_type": "colour", "question": f"Question {qid}?",
          "options": options, "answer": answer}


def _write(path, records):
  with open(path, "w") as f:
    json.dump(records, f)
  return str(path)


def test_videomme_accuracy_by_duration_with_a_wrong_answer(tmp_path, capsys):
  _touch_videos(tmp_path / "videos", "s1.mp4", "m1.mp4", "l1.mp4")
  file = _write(tmp_path / "videomme.json", [
      _videomme_record("1-1", "s1", "short", "A"),
      _videomme_record("1-2", "s1", "short", "C"),
      _videomme_record("2-1", "m1", "medium", "B"),
      _videomme_record("3-1", "l1", "long", "D"),
      _videomme_record("3-2", "l1", "long", "A"),
  ])
  stub = StubAnswerer({
      "1-1": ("A", "A"), "1-2": ("C", "The answer is (C)."), "2-1": ("B", "blue"),
      "3-1": ("B", "I think D."),   # likelihood wrong, generation right
      "3-2": ("A", "none of them"),  # generation names no option: wrong
  })
  out = str(tmp_path / "out" / "report.json")
  report = evaluate.run("videomme", file, answerer=stub, video_root=str(tmp_path / "videos"),
                        json_path=out)
  assert stub.videos == ["s1.mp4", "m1.mp4", "l1.mp4"]  # each video read once
  rows = {(r["method"], r["group"]): r for r in report["rows"]}
  assert [(r["method"], r["group"]) for r in report["rows"]] == [
      (m, g) for m in ("likelihood", "generate") for g in ("short", "medium", "long", "overall")]
  assert rows["likelihood", "overall"]["accuracy"] == pytest.approx(80.0)
  assert rows["likelihood", "long"]["accuracy"] == pytest.approx(50.0)
  assert rows["likelihood", "short"]["accuracy"] == pytest.approx(100.0)
  assert rows["generate", "overall"]["correct"] == 4
  assert rows["generate", "long"]["accuracy"] == pytest.approx(50.0)
  assert all(r["chance"] == pytest.approx(25.0) for r in report["rows"])
  records = {r["question_id"]: r for r in report["records"]}
  assert records["3-2"]["generate"] == {"text": "none of them", "choice": None, "correct": False}
  assert json.load(open(out))["rows"] == report["rows"]
  printed = capsys.readouterr().out.strip().splitlines()
  header = next(line for line in printed if "accuracy %" in line)
  assert "chance %" in header and "p vs chance" in header
  last = [cell.strip() for cell in printed[-1].split("|")]  # the table is printed last
  # p: guessing gets >= 4 of 5 right with probability 5 * 0.25^4 * 0.75 + 0.25^5.
  assert last == ["generate", "overall", "5", "4", "80.0", "25.0", "0.016"]
  assert rows["generate", "overall"]["p_value"] == pytest.approx(0.015625)


def test_chance_p_value_is_the_exact_tail_of_guessing():
  p = evals.chance_p_value
  assert p(0, [0.25] * 10) == 1.0 and p(11, [0.25] * 10) == 0.0
  assert p(3, [0.25] * 3) == pytest.approx(0.25 ** 3)
  tail = sum(math.comb(48, k) * 0.25 ** k * 0.75 ** (48 - k) for k in range(20, 49))
  assert p(20, [0.25] * 48) == pytest.approx(tail, rel=1e-12)
  # Mixed option counts (the Poisson-binomial path) agree with the binomial in the limit
  # and with a hand count: right on one of (1/4, 1/5) with 1 - 3/4 * 4/5.
  assert p(20, [0.25] * 47 + [0.25 + 1e-12]) == pytest.approx(tail, rel=1e-9)
  assert p(1, [0.25, 0.2]) == pytest.approx(0.4)
  assert p(2, [0.25, 0.2]) == pytest.approx(0.05)


def test_longvideobench_groups_and_mixed_chance(tmp_path):
  _touch_videos(tmp_path / "videos", "a.mp4", "b.mp4")
  record = lambda i, video, group, correct, n: {
      "id": f"q{i}", "video_path": video, "question": "Which?", "duration_group": group,
      "duration": 10.0, "candidates": [f"option {j}" for j in range(n)],
      "correct_choice": correct}
  file = _write(tmp_path / "lvb_val.json", [record(0, "a.mp4", 15, 1, 4),
                                            record(1, "b.mp4", 3600, 4, 5)])
  items = evals.read_items("longvideobench", file)  # videos default to <dir>/videos
  assert [i.options[-1] for i in items] == ["D. option 3", "E. option 4"]
  assert [(i.answer, i.group) for i in items] == [("B", "8-15s"), ("E", "900-3600s")]
  report = evaluate.run("longvideobench", file, methods=("likelihood",),
                        answerer=StubAnswerer({"q0": ("B", ""), "q1": ("A", "")}))
  rows = {r["group"]: r for r in report["rows"]}
  assert rows["overall"]["accuracy"] == pytest.approx(50.0)
  assert rows["overall"]["chance"] == pytest.approx(100 * (1 / 4 + 1 / 5) / 2)
  assert rows["900-3600s"]["correct"] == 0


def test_activitynet_qa_exact_match_f1_and_the_no_judge_note(tmp_path, capsys):
  _touch_videos(tmp_path, "v_abc.mp4", "xyz.mkv")
  questions = _write(tmp_path / "test_q.json", [
      {"video_name": "abc", "question": "what is he doing", "question_id": "abc_0"},
      {"video_name": "xyz", "question": "what colour is the car", "question_id": "xyz_0"}])
  _write(tmp_path / "test_a.json", [{"question_id": "xyz_0", "answer": "red", "type": 4},
                                    {"question_id": "abc_0", "answer": "playing guitar",
                                     "type": 0}])
  report = evaluate.run("activitynetqa", questions, answerer=StubAnswerer(
      {"abc_0": "He is playing the guitar.", "xyz_0": "Red."}))
  rows = {r["group"]: r for r in report["rows"]}
  assert rows["color"]["exact_match"] == 100.0
  assert rows["motion"]["exact_match"] == 0.0
  assert rows["motion"]["f1"] == pytest.approx(100 * 2 * (2 / 4) * 1 / (2 / 4 + 1))
  assert "no LLM judge" in capsys.readouterr().out


def test_synthetic_reads_the_manifest(tmp_path):
  _touch_videos(tmp_path / "eval" / "videos", "synth_001.mp4")
  _write(tmp_path / "eval" / "videomme.json", [_videomme_record("001-1", "synth_001", "short",
                                                                "C")])
  _write(tmp_path / "manifest.json", {"eval": {"annotations": "eval/videomme.json",
                                               "video_root": "eval/videos"}})
  report = evaluate.run("synthetic", str(tmp_path), methods=("generate",),
                        answerer=StubAnswerer({"001-1": ("A", "C")}))
  assert report["rows"][-1]["accuracy"] == 100.0


@pytest.mark.parametrize("benchmark, records, message", [
    ("videomme", [_videomme_record("1-1", "s1", "short", "A"),
                  _videomme_record("1-2", "s1", "short", "E")],
     r"record 1 \(id 1-2\): answer 'E' is not one of the options"),
    ("videomme", [{**_videomme_record("1-1", "s1", "short", "A"), "options": None}],
     r"record 0 \(id 1-1\): missing field 'options'"),
    ("videomme", [_videomme_record("1-1", "gone", "short", "A")],
     r"record 0 \(id 1-1\): video file .*gone\.mp4 \(field 'videoID'\) not found"),
    ("longvideobench", [{"id": "q7", "video_path": "s1.mp4", "question": "?",
                         "candidates": ["x", "y"], "correct_choice": 2, "duration_group": 60}],
     r"record 0 \(id q7\): field 'correct_choice' = 2 is not an index"),
])
def test_bad_records_name_file_record_and_field(tmp_path, benchmark, records, message):
  _touch_videos(tmp_path / "videos", "s1.mp4")
  file = _write(tmp_path / "annotations.json", records)
  with pytest.raises(DataError, match=message) as error:
    evaluate.run(benchmark, file, answerer=StubAnswerer({}),
                 video_root=str(tmp_path / "videos"))
  assert str(error.value).startswith(file)


def _five_questions(tmp_path):
  """Five questions about three videos, and a stub answering 4 of them right."""
  _touch_videos(tmp_path / "videos", "s1.mp4", "m1.mp4", "l1.mp4")
  file = _write(tmp_path / "videomme.json", [
      _videomme_record("1-1", "s1", "short", "A"), _videomme_record("1-2", "s1", "short", "C"),
      _videomme_record("2-1", "m1", "medium", "B"),
      _videomme_record("3-1", "l1", "long", "D"), _videomme_record("3-2", "l1", "long", "A")])
  table = {"1-1": ("A", "A"), "1-2": ("C", "C"), "2-1": ("B", "B"), "3-1": ("B", "B"),
           "3-2": ("A", "A")}
  return file, table


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_answers_are_kept_when_a_video_fails_and_a_rerun_resumes(tmp_path, capsys):
  file, table = _five_questions(tmp_path)
  out = str(tmp_path / "eval.json")
  kw = dict(video_root=str(tmp_path / "videos"), methods=("likelihood",), json_path=out)
  stub = StubAnswerer(table, bad={"m1.mp4"})
  with pytest.raises(DataError) as error:
    evaluate.run("videomme", file, answerer=stub, **kw)
  message = str(error.value)
  assert message.startswith(str(tmp_path / "videos" / "m1.mp4") + ": cannot open video")
  assert "the 2 answers so far are in " + str(tmp_path / "eval.records.jsonl") in message
  assert "\n" not in message and not os.path.exists(out)
  lines = _lines(tmp_path / "eval.records.jsonl")
  assert lines[0]["header"]["benchmark"] == "videomme"
  assert [r["question_id"] for r in lines[1:]] == ["1-1", "1-2"]
  # The same command again (the video now reads): only the three others are asked, and
  # the table covers all five answers.
  again = StubAnswerer(table)
  report = evaluate.run("videomme", file, answerer=again, **kw)
  assert again.asked == ["2-1", "3-1", "3-2"]
  assert [r["question_id"] for r in report["records"]] == ["1-1", "1-2", "2-1", "3-1", "3-2"]
  overall = report["rows"][-1]
  assert (overall["n"], overall["correct"]) == (5, 4)
  assert json.load(open(out))["num_answered"] == 5
  assert len(_lines(tmp_path / "eval.records.jsonl")) == 1 + 5
  # A finished file: nothing is asked again.
  done = StubAnswerer(table)
  assert evaluate.run("videomme", file, answerer=done, **kw)["rows"] == report["rows"]
  assert done.asked == []


def test_skip_bad_skips_and_counts_a_bad_video(tmp_path, capsys):
  file, table = _five_questions(tmp_path)
  records = str(tmp_path / "answers.jsonl")
  kw = dict(video_root=str(tmp_path / "videos"), methods=("likelihood",),
            records_path=records)
  report = evaluate.run("videomme", file, answerer=StubAnswerer(table, bad={"m1.mp4"}),
                        skip_bad=True, **kw)
  assert (report["num_questions"], report["num_answered"], report["num_skipped"]) == (5, 4, 1)
  assert report["skipped"][0]["video"].endswith("m1.mp4")
  assert "cannot open video" in report["skipped"][0]["error"]
  assert report["rows"][-1]["n"] == 4 and "medium" not in [r["group"] for r in report["rows"]]
  assert "SKIPPED: 1 questions of 1 unreadable video(s)" in capsys.readouterr().out
  # The skipped video is tried again by a later run.
  again = StubAnswerer(table)
  assert evaluate.run("videomme", file, answerer=again, **kw)["rows"][-1]["n"] == 5
  assert again.asked == ["2-1"]
  # Every video bad: an error, not an empty table.
  with pytest.raises(DataError, match="no question was answered: all 3 videos failed"):
    evaluate.run("videomme", file, answerer=StubAnswerer(table, bad={"s1.mp4", "m1.mp4",
                                                                     "l1.mp4"}),
                 skip_bad=True, video_root=str(tmp_path / "videos"), methods=("likelihood",))


def test_records_of_another_evaluation_are_not_resumed_and_a_torn_line_is_dropped(tmp_path):
  file, table = _five_questions(tmp_path)
  records = tmp_path / "answers.jsonl"
  kw = dict(video_root=str(tmp_path / "videos"), records_path=str(records))
  evaluate.run("videomme", file, answerer=StubAnswerer(table), methods=("likelihood",),
               settings={"checkpoint": "/runs/a"}, **kw)
  with pytest.raises(DataError, match=r"different evaluation \(checkpoint: '/runs/a' in the "
                                      r"file, '/runs/b' now\)"):
    evaluate.run("videomme", file, answerer=StubAnswerer(table), methods=("likelihood",),
                 settings={"checkpoint": "/runs/b"}, **kw)
  with pytest.raises(DataError, match=r"methods: \['likelihood'\] in the file"):
    evaluate.run("videomme", file, answerer=StubAnswerer(table),
                 settings={"checkpoint": "/runs/a"}, **kw)
  # A kill in the middle of a write leaves a last line without its newline.
  text = records.read_text().splitlines(keepends=True)
  records.write_text("".join(text[:-1]) + text[-1][:20])
  again = StubAnswerer(table)
  report = evaluate.run("videomme", file, answerer=again, methods=("likelihood",),
                        settings={"checkpoint": "/runs/a"}, **kw)
  assert again.asked == ["3-2"] and report["rows"][-1]["n"] == 5
  assert len(_lines(records)) == 1 + 5


def test_model_answerer_raises_data_error_on_a_corrupt_video(streamer, sampler, tmp_path):
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"\x00" * 1000)
  item = MCItem("q", str(corrupt), "What colour?", tuple(OPTIONS), "A", "short")
  with pytest.raises(DataError, match="corrupt.mp4: cannot open video"):
    ModelAnswerer(streamer, sampler).answer_mc(str(corrupt), [item], ("likelihood",))


def test_parse_choice_exact_match_and_f1():
  item = MCItem("q", "v.mp4", "Which colour?", tuple(OPTIONS), "B", "short")
  assert parse_choice("B", item) == "B"
  assert parse_choice("(C) green", item) == "C"
  assert parse_choice("The answer is D.", item) == "D"
  assert parse_choice("yellow!", item) == "D"  # no letter: the option text it equals
  assert parse_choice("Because E.", item) is None  # E is not an option
  assert parse_choice("", item) is None
  assert item.option_text("B") == "blue"  # what likelihood_target=text scores
  assert exact_match("The Red.", "red") == 1.0
  assert exact_match("red car", "red") == 0.0
  assert token_f1("a red car", "the red bus") == pytest.approx(0.5)
  assert token_f1("red", "blue") == 0.0
  assert token_f1("", "") == 1.0


def test_model_answerer_scores_options_from_the_saved_state(streamer, sampler, video,
                                                           tmp_path):
  """The real answerer on the random tiny model: the chosen option is the argmax of the
  mean log-probs, which equal log-probs scored directly from the question's state."""
  answerer = ModelAnswerer(streamer, sampler, mc_max_new_tokens=4)
  item = MCItem("q", video, "What colour is the circle?", tuple(OPTIONS), "A", "short")
  (result,) = answerer.answer_mc(video, [item], ("likelihood", "generate"))
  scores = result["likelihood"]["scores"]
  assert result["likelihood"]["choice"] == max(scores, key=lambda k: scores[k]["mean"])
  conv = streamer.ask(streamer.read_video(video), "\n".join(
      ["What colour is the circle?", *OPTIONS,
       "Answer with the option's letter from the given choices directly."]))
  ids = streamer.tokenizer.encode("C").ids + [streamer.ids.endoftext]
  assert scores["C"]["sum"] == pytest.approx(float(streamer.token_logprobs(conv, ids).sum()),
                                             abs=1e-5)
  assert set(result["generate"]) == {"text", "choice"}


def test_text_target_is_a_cloze_test_on_the_bare_question(streamer, sampler, video):
  """target='text' asks the question without its options and scores each option's text."""
  answerer = ModelAnswerer(streamer, sampler, target="text")
  item = MCItem("q", video, "What colour is the circle?", tuple(OPTIONS), "A", "short")
  (result,) = answerer.answer_mc(video, [item], ("likelihood",))
  conv = streamer.ask(streamer.read_video(video), "What colour is the circle?")
  for letter in "ABCD":
    ids = streamer.tokenizer.encode(item.option_text(letter)).ids + [streamer.ids.endoftext]
    assert result["likelihood"]["scores"][letter]["sum"] == pytest.approx(
        float(streamer.token_logprobs(conv, ids).sum()), abs=1e-5)


def test_checkpoint_load_from_workdir_and_export(tiny_model, tokenizer, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  save_model(tiny_model, workdir / "model")
  tokenizer.save(str(tmp_path / "tok.json"))
  with open(workdir / "config.json", "w") as f:
    json.dump({"data": {"tokenizer": str(tmp_path / "tok.json"), "synthetic_dir": ""}}, f)
  model, tok = checkpoint.load(str(workdir))
  np.testing.assert_array_equal(np.asarray(model.llm.embedding[...]),
                                np.asarray(tiny_model.llm.embedding[...]))
  assert tok.get_vocab() == tokenizer.get_vocab()
  # The export folder itself finds the tokenizer through its workdir's config.json.
  assert checkpoint.resolve(str(workdir / "model")) == (str(workdir / "model"),
                                                        str(tmp_path / "tok.json"))
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    checkpoint.resolve(str(tmp_path))
  os.remove(workdir / "config.json")
  with pytest.raises(ValueError, match="--tokenizer"):
    checkpoint.resolve(str(workdir))
  assert isinstance(model, type(tiny_model)) and nnx.graphdef(model) == nnx.graphdef(tiny_model)
  # --ssd_impl: the same weights, another SSD backend; an unknown name is refused first.
  other, _ = checkpoint.load(str(workdir / "model"), tokenizer=str(tmp_path / "tok.json"),
                             ssd_impl="pallas")
  assert other.config.ssd_impl == "pallas" and other.llm.config.ssd_impl == "pallas"
  assert model.llm.config.ssd_impl == tiny_model.llm.config.ssd_impl
  np.testing.assert_array_equal(np.asarray(other.llm.embedding[...]),
                                np.asarray(tiny_model.llm.embedding[...]))
  with pytest.raises(ValueError, match="'cuda'"):
    checkpoint.load(str(workdir / "model"), tokenizer=str(tmp_path / "tok.json"),
                    ssd_impl="cuda")
  # A checkpoint saved with "auto" gets inference's pick for the platform (pallas on a GPU;
  # here the CPU's pick is set to it); one saved with a backend's name keeps it.
  config_file = workdir / "model" / "model_config.json"
  config_file.write_text(config_file.read_text().replace('"ssd_impl": "xla"',
                                                         '"ssd_impl": "auto"'))
  monkeypatch.setitem(checkpoint.INFERENCE_AUTO_SSD, jax.default_backend(), "pallas")
  picked, _ = checkpoint.load(str(workdir / "model"), tokenizer=str(tmp_path / "tok.json"))
  assert picked.config.ssd_impl == "pallas" and picked.llm.config.ssd_impl == "pallas"
  assert model.config.ssd_impl == "xla"


def test_inference_ssd_impl_reads_auto_as_pallas_on_a_gpu_only():
  """A checkpoint saved with ssd_impl 'auto' runs inference on the Pallas SSD on a GPU
  (infer/checkpoint.INFERENCE_AUTO_SSD); elsewhere 'auto' stays; a named backend, saved or
  asked for, is kept; an unknown name asked for is refused."""
  assert checkpoint.inference_ssd_impl("auto", platform="gpu") == "pallas"
  assert checkpoint.inference_ssd_impl("auto", platform="cpu") == "auto"
  assert checkpoint.inference_ssd_impl("triton", platform="gpu") == "triton"
  assert checkpoint.inference_ssd_impl("auto", "triton", platform="gpu") == "triton"
  assert checkpoint.inference_ssd_impl("pallas", "auto", platform="gpu") == "auto"
  with pytest.raises(ValueError, match="'cuda'"):
    checkpoint.inference_ssd_impl("auto", "cuda", platform="gpu")


TOY_BENCHMARK = '''"""A toy benchmark written by the test: a JSON list of {"id", "clip", "question",
"choices": [str], "answer": index}; clips are relative to the file's folder."""

import os

from ma2mba_jax.data.formats import Record, load_records
from ma2mba_jax.evals import LETTERS, MCItem, check_video

KIND = "multiple_choice"
GROUPS = ("toy",)
LIKELIHOOD_TARGET = "letter"


def read_items(annotations, *, video_root="", answers=""):
  root = video_root or os.path.dirname(os.path.abspath(annotations))
  items = []
  for index, record in enumerate(load_records(annotations)):
    rec = Record(record, annotations, index)
    choices = rec.get("choices", list)
    options = tuple(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    path = check_video(rec, os.path.join(root, rec.get("clip")), "clip")
    items.append(MCItem(rec.id, path, rec.get("question"), options,
                        LETTERS[rec.get("answer", int)], "toy"))
  return items
'''


@pytest.fixture
def plugin_dir(tmp_path):
  """A folder placed on ma2mba_jax.evals' search path: a module written there is a
  benchmark, as a new file in ma2mba_jax/evals/ would be."""
  with plugin_folder(evals, tmp_path / "plugins") as folder:
    yield pathlib.Path(folder)


def test_a_new_benchmark_is_one_file(plugin_dir, streamer, sampler, video, tmp_path):
  """A benchmark module dropped into the package runs end to end through evaluate with the
  tiny model, and answers exactly as the same questions in the Video-MME layout do."""
  (plugin_dir / "toyqa.py").write_text(TOY_BENCHMARK)
  assert "toyqa" in evals.names()
  data = tmp_path / "toy"
  data.mkdir()
  os.symlink(video, data / "clip.mp4")
  questions = [("t1", "What colour is the circle?", ["red", "blue", "green"], 2),
               ("t2", "Which way does it move?", ["up", "down", "left", "right"], 0)]
  toy = _write(data / "toy.json", [{"id": qid, "clip": "clip.mp4", "question": q,
                                    "choices": c, "answer": a} for qid, q, c, a in questions])
  mme = _write(data / "mme.json", [{
      "video_id": qid, "videoID": "clip", "duration": "short", "question_id": qid,
      "task_type": "t", "question": q, "options": [f"{'ABCD'[j]}. {x}" for j, x in enumerate(c)],
      "answer": "ABCD"[a]} for qid, q, c, a in questions])
  answerer = ModelAnswerer(streamer, sampler, target="letter", batch=False)  # shapes compiled above
  report = evaluate.run("toyqa", toy, answerer=answerer, methods=("likelihood",),
                        json_path=str(tmp_path / "toy_eval.json"))
  assert [(r["group"], r["n"]) for r in report["rows"]] == [("toy", 2), ("overall", 2)]
  assert report["rows"][-1]["chance"] == pytest.approx(100 * (1 / 3 + 1 / 4) / 2)
  reference = evaluate.run("videomme", mme, answerer=answerer, methods=("likelihood",))
  for got, want in zip(report["records"], reference["records"], strict=True):
    assert (got["question_id"], got["answer"]) == (want["question_id"], want["answer"])
    assert got["likelihood"] == want["likelihood"]
  assert json.loads((tmp_path / "toy_eval.json").read_text())["benchmark"] == "toyqa"


def test_a_benchmark_module_missing_a_declaration_is_named(plugin_dir):
  (plugin_dir / "broken.py").write_text('KIND = "multiple_choice"\nGROUPS = ()\n')
  with pytest.raises(TypeError, match=r"broken\.py: benchmark 'broken' must define "
                                      r"LIKELIHOOD_TARGET"):
    evals.get("broken")
  with pytest.raises(ValueError, match=r"unknown benchmark 'nope'; expected one of \("):
    evals.read_items("nope", "x.json")
