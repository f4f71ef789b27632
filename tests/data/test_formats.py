"""The annotation formats on hand-written records: parsed samples, the token / label /
placeholder layout of the examples they make (explicit lists; vocabulary in
test_template.py), budget fitting, and errors naming file, record and field."""

import csv
import json
import logging
import pathlib

import numpy as np
import pytest

from ma2mba_jax.data import formats
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.example import ExampleSpec, build_example
from ma2mba_jax.data.formats import (WHOLE, Exchange, Sample, format_multiple_choice,
                                     read_source, read_videomme)
from ma2mba_jax.data.scenes import write_png
from tests.plugins import plugin_folder

SYSTEM = [1, 5, 6, 7, 8, 9, 10, 0]
N = -1


@pytest.fixture(scope="module")
def media(tmp_path_factory, write_index_video):
  """A folder with vids/v1.mp4 (4 s, 4 fps), vids/v2.mp4 (2 s) and img.png."""
  root = tmp_path_factory.mktemp("media")
  write_index_video(root / "vids" / "v1.mp4", seconds=4)
  write_index_video(root / "vids" / "v2.mp4", seconds=2)
  write_png(str(root / "img.png"), np.full((20, 30, 3), 200, np.uint8))
  return root


def _json(path, records):
  path.write_text(json.dumps(records))
  return str(path)


def _spec(**kw):
  return ExampleSpec(**{"fps": 1.0, "image_size": 8, "tokens_per_frame": 1, "max_frames": 16,
                        "max_tokens": 128, **kw})


def _conv(*texts):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def test_llava_image_caption(media, word_tokenizer):
  path = _json(media / "pretrain.json", [{
      "id": "img1", "image": "img.png",
      "conversations": _conv("<image>\nDescribe the image briefly.", "a red circle.")}])
  [sample] = read_source("llava", path, str(media)).samples
  assert sample == Sample("img1", path, 0, "image", str(media / "img.png"),
                          (Exchange("Describe the image briefly.", "a red circle.", WHOLE),))
  ex = build_example(sample, tokenizer=word_tokenizer, spec=_spec(tokens_per_frame=2))
  assert ex["tokens"].tolist() == SYSTEM + [2, 4, 4, 20, 21, 24, 23, 10, 0, 3, 7, 16, 18, 10, 0]
  assert ex["loss_mask"].astype(int).tolist() == [0] * 8 + [0] * 10 + [1] * 5
  assert ex["vision_index"].tolist() == [N] * 8 + [N, 0, 1] + [N] * 12
  assert ex["frames"].shape == (1, 8, 8, 3) and ex["frames"].min() >= 195
  assert ex["num_dropped"] == 0


def test_webvid_video_caption(media, word_tokenizer, frame_indices):
  path = media / "webvid.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
    writer.writerow(["v1", "http://x", "PT00H00M04S", "vids", "a red circle moves left."])
  [sample] = read_source("webvid", str(path), str(media)).samples
  assert sample.path == str(media / "vids" / "v1.mp4") and sample.media == "video"
  # The same as JSON, with a numeric videoid.
  as_json = _json(media / "webvid.json", [{"videoid": 1, "page_dir": "vids", "name": "x"}])
  assert read_source("webvid", as_json, str(media)).samples[0].path == str(
      media / "vids" / "1.mp4")
  ex = build_example(sample, tokenizer=word_tokenizer, spec=_spec())
  assert ex["tokens"].tolist() == SYSTEM + [2, 4, 4, 4, 4, 20, 21, 22, 23, 10, 0,
                                            3, 7, 16, 18, 26, 27, 10, 0]
  assert ex["loss_mask"].astype(int).tolist() == [0] * 20 + [1] * 7
  assert ex["vision_index"].tolist() == [N] * 9 + [0, 1, 2, 3] + [N] * 14
  assert frame_indices(ex["frames"]) == [0, 4, 8, 12]


def test_scenewalk_clips_interleaved_with_captions(media, word_tokenizer, frame_indices):
  path = _json(media / "walk.json", [{
      "video_id": "w1", "video": "vids/v1.mp4", "duration": 4.0,
      "segments": [{"start": 0, "end": 2.5, "caption": "a red circle."},
                   {"start": 2.5, "end": 4.0, "caption": "Then a blue square."}]}])
  [sample] = read_source("scenewalk", path, str(media)).samples
  assert sample.exchanges == (Exchange("", "a red circle.", (0.0, 2.5)),
                              Exchange("", "Then a blue square.", (2.5, 4.0)))
  ex = build_example(sample, tokenizer=word_tokenizer, spec=_spec())
  assert ex["tokens"].tolist() == SYSTEM + [2, 4, 4, 4, 0, 3, 7, 16, 18, 10, 0,
                                            2, 4, 0, 3, 25, 7, 17, 19, 10, 0]
  assert ex["loss_mask"].astype(int).tolist() == [0] * 8 + [0] * 6 + [1] * 5 + [0] * 4 + [1] * 6
  assert ex["vision_index"].tolist() == [N] * 8 + [N, 0, 1, 2] + [N] * 7 + [N, 3] + [N] * 8
  assert frame_indices(ex["frames"]) == [0, 4, 8, 12]
  # A budget of 3 frames keeps only the first clip and its caption.
  cut = build_example(sample, tokenizer=word_tokenizer, spec=_spec(max_frames=3))
  assert cut["tokens"].tolist() == ex["tokens"][:19].tolist() and cut["num_dropped"] == 1
  # So does a budget of 20 tokens.
  cut = build_example(sample, tokenizer=word_tokenizer, spec=_spec(max_tokens=20))
  assert cut["tokens"].tolist() == ex["tokens"][:19].tolist() and cut["num_dropped"] == 1


@pytest.fixture
def qa_file(media):
  return _json(media / "qa.json", [
      {"id": "q1", "video": "vids/v1.mp4", "conversations": _conv("<image>\nWhat colour?", "red.")},
      {"id": "q9", "video": "vids/v2.mp4", "conversations": _conv("<image>\nWhat?", "square.")},
      {"id": "q2", "video": "vids/v1.mp4", "conversations": _conv("What?", "circle.")},
  ])


def test_llava_video_qa_packed_per_video(media, qa_file, word_tokenizer, frame_indices):
  samples = read_source("llava", qa_file, str(media), pack_per_video=True).samples
  assert [s.id for s in samples] == ["q1+1#0", "q9"]
  assert samples[0].exchanges == (Exchange("What colour?", "red.", WHOLE),
                                  Exchange("What?", "circle.", None))
  ex = build_example(samples[0], tokenizer=word_tokenizer, spec=_spec(max_frames=2))
  assert ex["tokens"].tolist() == SYSTEM + [2, 4, 4, 11, 12, 13, 0, 3, 16, 10, 0,
                                            2, 11, 13, 0, 3, 18, 10, 0]
  assert ex["loss_mask"].astype(int).tolist() == [0] * 16 + [1] * 3 + [0] * 5 + [1] * 3
  assert ex["vision_index"].tolist() == [N] * 9 + [0, 1] + [N] * 16
  assert frame_indices(ex["frames"]) == [0, 12]  # 4 grid frames spread down to 2
  split = read_source("llava", qa_file, str(media), pack_per_video=True, qa_per_sample=1)
  assert [(s.id, len(s.exchanges)) for s in split.samples] == [
      ("q1+1#0", 1), ("q1+1#1", 1), ("q9", 1)]
  assert all(s.exchanges[0].span == WHOLE for s in split.samples)


def test_frame_budget_then_dropped_questions(media, qa_file, word_tokenizer):
  [sample, _] = read_source("llava", qa_file, str(media), pack_per_video=True).samples
  # The first exchange without frames is 17 tokens: 19 leaves room for 2 frames, and the
  # follow-up question is cut.
  ex = build_example(sample, tokenizer=word_tokenizer, spec=_spec(max_tokens=19))
  assert ex["tokens"].tolist() == SYSTEM + [2, 4, 4, 11, 12, 13, 0, 3, 16, 10, 0]
  assert ex["num_dropped"] == 1
  with pytest.raises(DataError, match=f"{qa_file}: record 0 \\(id q1\\+1#0\\): not even one frame"):
    build_example(sample, tokenizer=word_tokenizer, spec=_spec(max_tokens=17))


@pytest.mark.parametrize("fmt,record,field", [
    ("llava", {"id": "b", "image": "img.png"}, "conversations"),
    ("llava", {"id": "b", "conversations": _conv("q", "a")}, "image' or 'video"),
    ("llava", {"id": "b", "image": "img.png",
               "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
     "conversations[1].value"),
    ("webvid", {"videoid": "b", "page_dir": "vids"}, "name"),
    ("scenewalk", {"video_id": "b", "video": "vids/v1.mp4",
                   "segments": [{"start": 0, "end": 1, "caption": "x"},
                                {"start": 1, "caption": "y"}]}, "segments[1].end"),
    ("scenewalk", {"video_id": "b", "segments": []}, "video"),
])
def test_record_missing_a_field_names_file_record_and_field(media, fmt, record, field):
  good = {"llava": {"id": "a", "image": "img.png", "conversations": _conv("q", "a")},
          "webvid": {"videoid": "a", "page_dir": "vids", "name": "x"},
          "scenewalk": {"video_id": "a", "video": "v.mp4",
                        "segments": [{"start": 0, "end": 1, "caption": "x"}]}}[fmt]
  path = _json(media / f"bad_{fmt}.jsonl", [])
  with open(path, "w") as f:
    f.write(json.dumps(good) + "\n" + json.dumps(record) + "\n")
  message = f"{path}: record 1 (id b): missing field '{field}'"
  with pytest.raises(DataError, match=message.replace("[", "\\[").replace("(", "\\(")
                     .replace(")", "\\)").replace("]", "\\]")):
    read_source(fmt, path, str(media))


def test_skip_bad_skips_and_counts(media, caplog):
  path = _json(media / "mixed.json", [
      {"id": "a", "image": "img.png", "conversations": _conv("q", "a")},
      {"id": "b", "image": "img.png"},
      {"id": "c", "video": "vids/v1.mp4", "conversations": _conv("q", "a", "q2")},
  ])
  with caplog.at_level(logging.WARNING):
    index = read_source("llava", path, str(media), skip_bad=True)
  assert [s.id for s in index.samples] == ["a"]
  assert len(index.skipped) == 2
  assert "record 1 (id b): missing field 'conversations'" in index.skipped[0]
  assert "record 2 (id c): field 'conversations' should alternate" in index.skipped[1]
  assert f"skipped 2 of 3 records of {path}" in caplog.text


def test_timestamps_outside_the_video(media, word_tokenizer):
  # With the duration in the record: caught when the file is read.
  path = _json(media / "walk_bad.json", [{
      "video_id": "w", "video": "vids/v1.mp4", "duration": 4.0,
      "segments": [{"start": 0, "end": 9.0, "caption": "x"}]}])
  with pytest.raises(DataError, match=f"{path}: record 0 \\(id w\\): segments\\[0\\] ends at 9.0s, "
                     "outside the video"):
    read_source("scenewalk", path, str(media))
  # Without it: caught on decoding, naming the record and the video file.
  path = _json(media / "walk_bad2.json", [{
      "video_id": "w", "video": "vids/v1.mp4",
      "segments": [{"start": 1.0, "end": 9.0, "caption": "x"}]}])
  [sample] = read_source("scenewalk", path, str(media)).samples
  video = media / "vids" / "v1.mp4"
  with pytest.raises(DataError, match=f"{path}: record 0 \\(id w\\): {video}: end time 9.000s "
                     "is outside the video"):
    build_example(sample, tokenizer=word_tokenizer, spec=_spec())


def test_missing_media_names_record_and_file(media, word_tokenizer):
  path = _json(media / "missing.json", [
      {"id": "m", "video": "vids/none.mp4", "conversations": _conv("q", "a")}])
  [sample] = read_source("llava", path, str(media)).samples
  with pytest.raises(DataError, match=f"{path}: record 0 \\(id m\\): "
                     f"{media / 'vids' / 'none.mp4'}: video file not found"):
    build_example(sample, tokenizer=word_tokenizer, spec=_spec())


def test_bad_annotation_files(tmp_path):
  with pytest.raises(DataError, match="nope.json: annotation file not found"):
    read_source("llava", str(tmp_path / "nope.json"))
  (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{oops\n')
  with pytest.raises(DataError, match="broken.jsonl: line 2 is not valid JSON"):
    read_source("llava", str(tmp_path / "broken.jsonl"))
  with pytest.raises(ValueError, match="unknown annotation format 'coco'"):
    read_source("coco", str(tmp_path / "broken.jsonl"))


def test_videomme_layout(tmp_path):
  record = {"video_id": "001", "videoID": "abc", "duration": "short", "question_id": "001-1",
            "task_type": "colour", "question": "What colour?",
            "options": ["A. red", "B. blue", "C. green", "D. gray"], "answer": "B"}
  path = _json(tmp_path / "mme.json", [record, {**record, "question_id": "001-2",
                                                 "answer": "E"}])
  with pytest.raises(DataError, match="record 1 \\(id 001-2\\): answer 'E' is not one of"):
    read_videomme(path)
  path = _json(tmp_path / "mme.json", [record])
  [q] = read_videomme(path, "/videos")
  assert (q.path, q.options[1], q.answer) == ("/videos/abc.mp4", "B. blue", "B")
  assert format_multiple_choice(q.question, q.options) == (
      "What colour?\nA. red\nB. blue\nC. green\nD. gray\n"
      "Answer with the option's letter from the given choices directly.")


TOY_FORMAT = '''"""A toy format written by the test: a JSON list of {"clip", "text"}, one captioned
video each."""

from ma2mba_jax.data.formats import (VIDEO_CAPTION_PROMPT, WHOLE, Exchange, Record, Sample,
                                     media_path)


def parse(rec: Record, media_root: str) -> Sample:
  return Sample(rec.id, rec.path, rec.index, "video", media_path(media_root, rec.get("clip")),
                (Exchange(VIDEO_CAPTION_PROMPT, rec.get("text").strip(), WHOLE),))
'''


@pytest.fixture
def format_dir(tmp_path):
  """A folder placed on ma2mba_jax.data.formats' search path: a module written there is a
  format, as a new file in ma2mba_jax/data/formats/ would be."""
  with plugin_folder(formats, tmp_path / "plugins") as folder:
    yield pathlib.Path(folder)


def test_a_new_format_is_one_file(format_dir, media, word_tokenizer, tmp_path):
  """A format module dropped into the package is read by name and makes the same example
  as the same caption in the WebVid format."""
  (format_dir / "toycaps.py").write_text(TOY_FORMAT)
  assert "toycaps" in formats.names() and "webvid" in formats.names()
  toy = _json(tmp_path / "toy.json", [{"id": "c1", "clip": "vids/v1.mp4",
                                       "text": " a red circle moves left. "}])
  webvid = _json(tmp_path / "webvid.json", [{"videoid": "v1", "page_dir": "vids",
                                             "name": "a red circle moves left."}])
  [sample] = read_source("toycaps", toy, str(media)).samples
  [reference] = read_source("webvid", webvid, str(media)).samples
  assert (sample.path, sample.media, sample.exchanges) == (
      reference.path, reference.media, reference.exchanges)
  got = build_example(sample, tokenizer=word_tokenizer, spec=_spec())
  want = build_example(reference, tokenizer=word_tokenizer, spec=_spec())
  for key in ("tokens", "loss_mask", "vision_index", "frames"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(DataError, match=r"toy2\.json: record 0 \(id 0\): missing field 'text'"):
    read_source("toycaps", _json(tmp_path / "toy2.json", [{"clip": "vids/v1.mp4"}]))


def test_a_format_module_without_parse_is_named(format_dir):
  (format_dir / "noparse.py").write_text("PARSE = None\n")
  with pytest.raises(TypeError, match=r"noparse\.py: format 'noparse' must define parse"):
    read_source("noparse", "x.json")
  with pytest.raises(ValueError, match=r"unknown annotation format 'nope'; expected one of"):
    read_source("nope", "x.json")
