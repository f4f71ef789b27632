"""The synthetic dataset: what it writes, that every caption and answer is true of the
pixels (checked by a small pixel classifier), determinism, the eval layout, the CLI."""

import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from ma2mba_jax.data import manifest as manifest_lib
from ma2mba_jax.data import scenes, synthetic
from ma2mba_jax.data.formats import read_source, read_videomme
from ma2mba_jax.data.tokenizer import load_tokenizer
from ma2mba_jax.data.video import decode_video, load_image

CAPTION = re.compile(r"An? (\w+) (\w+) (?:moves (\w+)|stays (still)) on a (\w+) background\.")
IMAGE_CAPTION = re.compile(r"An? (\w+) (\w+) on a (\w+) background\.")


def _nearest(rgb, palette):
  return min(palette, key=lambda name: np.abs(np.array(palette[name]) - rgb).sum())


def _look(frame):
  """What a frame shows, from pixels only: (colour, shape, background, centroid (x, y))."""
  pixels = frame.reshape(-1, 3).astype(np.int32)
  values, counts = np.unique(pixels, axis=0, return_counts=True)
  background = _nearest(values[counts.argmax()], scenes.BACKGROUNDS)
  bg_rgb = np.array(scenes.BACKGROUNDS[background])
  mask = np.abs(frame.astype(np.int32) - bg_rgb).sum(-1) > 90
  colour = _nearest(np.median(frame[mask], axis=0), scenes.COLOURS)
  ys, xs = np.nonzero(mask)
  box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  fill = box.mean()
  top, bottom = np.array_split(box, 2, axis=0)
  if fill > 0.9:
    shape = "square"
  elif fill > 0.68:
    shape = "circle"
  else:
    shape = "triangle" if bottom.sum() > 1.5 * top.sum() else "diamond"
  return colour, shape, background, (xs.mean(), ys.mean())


def _motion(first, last):
  dx, dy = last[0] - first[0], last[1] - first[1]
  if max(abs(dx), abs(dy)) < 2:
    return "still"
  if abs(dx) > abs(dy):
    return "right" if dx > 0 else "left"
  return "down" if dy > 0 else "up"


def _check_caption(caption, frames):
  colour, shape, motion, still, background = CAPTION.fullmatch(caption).groups()
  looks = [_look(f) for f in frames]
  for seen in looks:
    assert seen[:3] == (colour, shape, background), (caption, seen)
  if len(looks) > 1:
    assert _motion(looks[0][3], looks[-1][3]) == (motion or still), caption


def test_the_pixel_checker_catches_false_captions(tiny_dataset):
  out, _ = tiny_dataset
  with open(os.path.join(out, "stage2", "scenewalk.json")) as f:
    walk = json.load(f)[0]
  segment = walk["segments"][0]
  frames, _ = decode_video(os.path.join(out, "stage2", walk["video"]), size=64,
                           start=segment["start"], end=segment["end"])
  _check_caption(segment["caption"], frames)
  colour, shape, motion, still, background = CAPTION.fullmatch(segment["caption"]).groups()
  lies = [segment["caption"].replace(f" {colour} ", " purple " if colour != "purple" else " red "),
          segment["caption"].replace(f"on a {background}",
                                     "on a gray" if background != "gray" else "on a white"),
          segment["caption"].replace(f" {shape} ", " square " if shape != "square" else " circle ")]
  for lie in lies:
    with pytest.raises(AssertionError):
      _check_caption(lie, frames)


def test_manifest_and_formats(tiny_dataset):
  out, manifest = tiny_dataset
  for relative in manifest["files"]:
    assert os.path.isfile(os.path.join(out, relative)), relative
  sources = {stage: manifest_lib.sources(out, stage) for stage in (1, 2, 3)}
  counts = {(stage, split): [len(read_source(s["format"], s["annotations"], s["media_root"])
                                 .samples) for s in entries]
            for stage, by_split in sources.items() for split, entries in by_split.items()}
  # tiny: 6 images + 3 clips; 2 walks; 4 (val 2) QA videos with 3 records each.
  assert counts == {(1, "train"): [6, 3], (2, "train"): [2], (3, "train"): [12],
                    (3, "val"): [6]}
  packed = read_source("llava", sources[3]["train"][0]["annotations"],
                       sources[3]["train"][0]["media_root"], pack_per_video=True).samples
  assert len(packed) == 4 and all(len(s.exchanges) == 2 + 2 + 1 for s in packed)


def test_stage3_asks_each_question_once_per_video(tiny_dataset):
  """A packed sample repeats no question, so no answer can be copied from an earlier turn;
  open-ended answers are the bare answer word; the caption comes last."""
  out, _ = tiny_dataset
  with open(os.path.join(out, "stage3", "llava_video_qa.json")) as f:
    records = json.load(f)
  by_video = {}
  for record in records:
    by_video.setdefault(record["video"], []).append(record)
  assert len(by_video) == 4
  for video_records in by_video.values():
    kinds = [r["id"].rsplit("_", 1)[1] for r in video_records]
    assert sorted(kinds[:2]) == ["mc", "open"] and kinds[2] == "detail"
    questions = [turn["value"].replace("<image>\n", "").split("\n")[0]
                 for r in video_records[:2] for turn in r["conversations"][::2]]
    assert len(questions) == len(set(questions)) == len(scenes.TASKS)
    by_kind = dict(zip(kinds, video_records))
    mc_answers = [turn["value"] for turn in by_kind["mc"]["conversations"][1::2]]
    assert len(mc_answers) == synthetic.MC_TASKS and set(mc_answers) <= set("ABCD")
    words = set(scenes.COLOURS) | set(scenes.SHAPES) | set(scenes.BACKGROUNDS) | set(
        scenes.MOTIONS)
    assert all(turn["value"] in words for turn in by_kind["open"]["conversations"][1::2])


def test_shape_radius_sets_the_drawn_size():
  scene = scenes.Scene("circle", "red", "black", "still", 1.0)
  area = lambda radius: int((scenes.draw(scene, 0.5, 32, radius=radius)
                             != scenes.BACKGROUNDS["black"]).any(-1).sum())
  assert area(0.14) == area(scenes.SHAPE_RADIUS)
  assert 2.0 < area(0.22) / area(0.14) < 3.0  # (0.22 / 0.14)^2 = 2.5
  with pytest.raises(ValueError, match="shape_radius must be in"):
    synthetic.generate("/tmp/unused", shape_radius=0.5)


def test_eval_videos_per_duration_class(tmp_path):
  manifest = synthetic.generate(str(tmp_path), frame_size=32, images=1, clips=1, walks=1,
                                qa_videos=1, qa_val_videos=1,
                                eval_videos={"short": 2, "long": 1})
  assert manifest["eval"]["by_duration"] == {"short": 8, "medium": 0, "long": 4}
  assert manifest["eval"]["num_questions"] == 12
  with pytest.raises(ValueError, match="unknown duration classes"):
    synthetic.generate(str(tmp_path / "x"), eval_videos={"huge": 1})


def test_captions_are_true_of_the_pixels(tiny_dataset):
  out, _ = tiny_dataset
  with open(os.path.join(out, "stage2", "scenewalk.json")) as f:
    walks = json.load(f)
  for walk in walks:
    for segment in walk["segments"]:
      frames, _ = decode_video(os.path.join(out, "stage2", walk["video"]), size=64,
                               start=segment["start"], end=segment["end"])
      _check_caption(segment["caption"], frames)
  with open(os.path.join(out, "stage1", "llava_images.json")) as f:
    for record in json.load(f):
      caption = record["conversations"][1]["value"]
      image = load_image(os.path.join(out, "stage1", record["image"]), 64)
      colour, shape, background = IMAGE_CAPTION.fullmatch(caption).groups()
      assert _look(image)[:3] == (colour, shape, background), caption


def test_eval_answers_are_true_of_the_key_scene(tiny_dataset):
  out, manifest = tiny_dataset
  ev = manifest["eval"]
  assert (ev["num_options"], ev["chance_accuracy"], ev["num_questions"]) == (4, 0.25, 12)
  assert ev["by_duration"] == {"short": 4, "medium": 4, "long": 4}
  assert ev["needle_questions"] >= 4  # the long video's key scene is <= 10% of it
  questions = read_videomme(os.path.join(out, ev["annotations"]),
                            os.path.join(out, ev["video_root"]))
  with open(os.path.join(out, ev["annotations"])) as f:
    records = {r["question_id"]: r for r in json.load(f)}
  for q in questions:
    assert [o[:3] for o in q.options] == ["A. ", "B. ", "C. ", "D. "]
    start, end = records[q.question_id]["key_scene"]
    frames, _ = decode_video(q.path, start=start, end=end, size=64)
    looks = [_look(f) for f in frames]
    colour, shape, background, _ = looks[0]
    truth = {"colour": colour, "shape": shape, "background": background,
             "motion": _motion(looks[0][3], looks[-1][3])}[q.task_type]
    answer_word = q.options["ABCD".index(q.answer)][3:]
    assert answer_word == truth, (q.question_id, q.question, q.options, q.answer)
    # The question names the key scene unambiguously.
    named = shape if q.task_type != "shape" else colour
    assert named in q.question


def test_tokenizer_covers_the_text(tiny_dataset):
  out, manifest = tiny_dataset
  tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
  assert manifest["vocab_size"] == tok.get_vocab_size() < 1100
  text = "A purple diamond moves up on a brown background."
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text and len(ids) <= 12  # whole words, mostly


def test_deterministic_by_seed_and_cli(tmp_path, capsys):
  """The promise: the same seed and sizes write byte-identical files, in any process.

  Found (issue 14, item 1b): libx264 with B-frames and its lookahead/macroblock tree reads
  memory it never wrote, so a video's bytes (and its decoded frames) depended on what the
  process's heap held before: fresh processes agreed, a pytest worker that had run other
  tests did not (walk_00000.mp4 about every other suite run). glibc's MALLOC_PERTURB_ fills
  new heap blocks with a given byte, which makes that deterministic: before the fix, 1, 85
  and 165 gave three different walk_00000.mp4 files here. With scenes.X264_PARAMS (no
  B-frames, no lookahead) 12 processes with PYTHONHASHSEED 1..12 and MALLOC_PERTURB_
  37*i % 256 wrote identical sets at frame sizes 32 and 64 (sha256 of every file), and 30
  videos x 7 fill bytes encoded identically. So the test writes the set in two processes with
  different fill bytes and hash seeds, and once in this (long-lived) one, and compares
  every file's bytes. Without MALLOC_PERTURB_ support (not glibc) it still compares."""
  counts = ["--images", "2", "--clips", "1", "--walks", "1", "--qa-videos", "1",
            "--qa-val-videos", "1", "--eval-videos", "1", "--frame-size", "32"]
  for name, hash_seed, fill in (("a", "1", "1"), ("b", "2", "165")):
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "MALLOC_PERTURB_": fill}
    subprocess.run([sys.executable, "-m", "ma2mba_jax.data.synthetic", "--out",
                    str(tmp_path / name), *counts], env=env, check=True, capture_output=True)
  flag_values = flags.FlagValues()  # the CLI in this process, on flags of its own
  synthetic.define_flags(flag_values)
  synthetic.main(flag_values(["synthetic", "--out", str(tmp_path / "c"), *counts]),
                 flag_values)
  assert "eval questions (4 options, chance 25%" in capsys.readouterr().out
  synthetic.generate(str(tmp_path / "d"), seed=1, frame_size=32, images=2, clips=1, walks=1,
                     qa_videos=1, qa_val_videos=1, eval_videos=1)
  with open(tmp_path / "a" / "manifest.json") as f:
    files = json.load(f)["files"]
  assert sum(f.endswith(".mp4") for f in files) == 7
  for other in ("b", "c"):
    for relative in files:
      assert filecmp.cmp(tmp_path / "a" / relative, tmp_path / other / relative,
                         shallow=False), (other, relative)
  assert not filecmp.cmp(tmp_path / "a" / "eval" / "videomme.json",
                         tmp_path / "d" / "eval" / "videomme.json", shallow=False)


def test_bad_arguments():
  with pytest.raises(ValueError, match="size must be one of"):
    synthetic.generate("/tmp/unused", size="huge")
  with pytest.raises(ValueError, match="frame_size must be an even number"):
    synthetic.generate("/tmp/unused", frame_size=33)
