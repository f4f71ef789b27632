"""A synthetic long-video dataset: real mp4 files of drawn scenes, truthful text, all three
training stages' formats, a Video-MME-style multiple-choice eval set, and a tokenizer.

    python -m ma2mba_jax.data.synthetic --out DIR [--seed 0] [--size tiny|small|long]
        [--frame-size 64] [--video-fps 4] [--shape-radius 0.14] [--walk-lengths scenewalk]
        [--images N] [--clips N] [--walks N] [--qa-videos N] [--qa-val-videos N]
        [--eval-videos N]

Writes under DIR (see docs/data_formats.md for the layouts):
  stage1/llava_images.json + stage1/images/*.png   LLaVA-Pretrain image captions
  stage1/webvid.csv + stage1/videos/*.mp4          WebVid-style video captions
  stage2/scenewalk.json + stage2/videos/*.mp4      long videos, a caption per scene
  stage3/llava_video_qa{,_val}.json + videos       LLaVA-Video QA, several records a video
                                                   (each question asked once a video)
  eval/videomme.json + eval/videos/*.mp4           4-option MC questions (chance 25%),
                                                   short/medium/long, with needle questions
  tokenizer.json                                   byte-level BPE trained on all the text
  manifest.json                                    what was written, and config sources
Every question is about a video's "key scene", whose shape and colour appear in no other
scene; in long videos that scene is a short needle in a haystack of other scenes. The
answers are visible in the frames (colour, shape, background, direction of motion), so a
small model can learn them. Deterministic for a seed (and sizes: each file has its own
random stream). Sizes: tiny (seconds, for tests), small (a CPU demo), long (hour-long
videos for benchmarks; slow to write).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from ma2mba_jax.data import scenes as sc
from ma2mba_jax.data.formats import VIDEO_CAPTION_PROMPT, format_multiple_choice
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer

IMAGE_PROMPTS = ("Describe the image briefly.", "What is shown in this picture?",
                 "Give a short caption for the image.")
DETAIL_PROMPT = "Describe the video in detail."
NUM_OPTIONS = 4
# Stage 3: tasks of a video asked as multiple choice (the others open-ended).
MC_TASKS = 2
# Bumped whenever what `generate` writes for given arguments changes (recorded in the
# manifest, so that a dataset written by an older generator is recognised).
GENERATOR_VERSION = 3
# A question is a "needle" when its key scene is at most this fraction of the video.
NEEDLE_FRACTION = 0.1
# Random streams: one per file, keyed by (seed, kind, index).
_KIND = {"image": 1, "clip": 2, "walk": 3, "qa": 4, "qa_val": 5, "eval": 6}


@dataclasses.dataclass(frozen=True)
class Preset:
  """How much to write. Ranges are (low, high) inclusive, in items or whole seconds."""
  images: int
  clips: int
  clip_len: tuple[int, int]
  walks: int
  walk_scenes: tuple[int, int]
  scene_len: tuple[int, int]
  qa_videos: int
  qa_scenes: tuple[int, int]
  qa_val_videos: int
  eval_videos: int | dict[str, int]  # per duration class (a dict: a count for each)
  eval_len: dict[str, tuple[int, int]]
  key_len: tuple[int, int]


PRESETS = {
    "tiny": Preset(images=6, clips=3, clip_len=(2, 3), walks=2, walk_scenes=(2, 3),
                   scene_len=(2, 3), qa_videos=4, qa_scenes=(1, 3), qa_val_videos=2,
                   eval_videos=1, eval_len={"short": (4, 6), "medium": (8, 12),
                                            "long": (20, 24)}, key_len=(2, 2)),
    "small": Preset(images=600, clips=300, clip_len=(3, 5), walks=150, walk_scenes=(3, 6),
                    scene_len=(2, 5), qa_videos=600, qa_scenes=(1, 4), qa_val_videos=40,
                    eval_videos=20, eval_len={"short": (8, 16), "medium": (30, 60),
                                              "long": (120, 180)}, key_len=(2, 4)),
    "long": Preset(images=64, clips=32, clip_len=(3, 5), walks=6, walk_scenes=(90, 150),
                   scene_len=(10, 40), qa_videos=8, qa_scenes=(20, 60), qa_val_videos=2,
                   eval_videos=4, eval_len={"short": (60, 120), "medium": (600, 900),
                                            "long": (2700, 3600)}, key_len=(3, 5)),
}


class _Writer:
  """Writes files under `out`, remembering them and every text for the tokenizer."""

  def __init__(self, out: str, seed: int, frame_size: int, video_fps: int,
               shape_radius: float):
    self.out, self.seed, self.size, self.fps = out, seed, frame_size, video_fps
    self.radius = shape_radius
    self.files: list[str] = []
    self.texts: list[str] = [SYSTEM_PROMPT, VIDEO_CAPTION_PROMPT, DETAIL_PROMPT,
                             *IMAGE_PROMPTS]

  def rng(self, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, _KIND[kind], index])

  def path(self, relative: str) -> str:
    self.files.append(relative)
    return os.path.join(self.out, relative)

  def video(self, relative: str, scenes: list[sc.Scene]) -> float:
    return sc.write_video(self.path(relative), scenes, size=self.size, fps=self.fps,
                          radius=self.radius)

  def json(self, relative: str, records) -> None:
    with open(self.path(relative), "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1)


def _seconds(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
  return int(rng.integers(bounds[0], bounds[1] + 1))


# SceneWalk's video lengths (the paper: 11.8K hours over 87.8K videos, about 8 minutes on
# average), for benchmarks of mixed-length training (issue 17): lognormal, capped at an hour.
SCENEWALK_MEAN_S = 480.0
SCENEWALK_MAX_S = 3600.0
SCENEWALK_SIGMA = 1.0


def scenewalk_lengths(rng: np.random.Generator, n: int, *, mean_s: float = SCENEWALK_MEAN_S,
                      max_s: float = SCENEWALK_MAX_S, sigma: float = SCENEWALK_SIGMA,
                      max_tokens: int | None = None, min_tokens: int = 16) -> np.ndarray:
  """n video lengths like SceneWalk's: lognormal with mean `mean_s` seconds (before the
  cap) and log-std `sigma`, capped at `max_s`. With `max_tokens`, returned as token counts
  with max_s -> max_tokens (int64 [n], at least min_tokens); else in seconds (float [n]).
  Not used by `generate` (whose output stays as it is)."""
  mu = np.log(mean_s) - sigma ** 2 / 2  # the mean of a lognormal is exp(mu + sigma^2 / 2)
  seconds = np.minimum(rng.lognormal(mu, sigma, size=n), max_s)
  if max_tokens is None:
    return seconds
  return np.clip(np.round(seconds / max_s * max_tokens), min_tokens, max_tokens).astype(int)


def _scene_list(rng, durations: Sequence[int], key_index: int | None) -> list[sc.Scene]:
  """Scenes of the given durations; consecutive ones differ (a visible scene change); the
  key scene's shape and colour appear nowhere else."""
  key = sc.random_scene(rng, durations[key_index]) if key_index is not None else None
  shapes = [s for s in sc.SHAPES if key is None or s != key.shape]
  colours = [c for c in sc.COLOURS if key is None or c != key.colour]
  result: list[sc.Scene] = []
  for i, duration in enumerate(durations):
    if i == key_index:
      scene = key
    else:
      while True:
        scene = sc.random_scene(rng, duration, shapes=shapes, colours=colours)
        if not result or (scene.shape, scene.colour) != (result[-1].shape, result[-1].colour):
          break
    result.append(scene)
  return result


def _video_with_key(rng, total: tuple[int, int] | None, n_scenes: tuple[int, int] | None,
                    preset: Preset) -> tuple[list[sc.Scene], int]:
  """A video with a key scene: `n_scenes` scenes, or scenes filling `total` seconds."""
  if total is not None:
    target = _seconds(rng, total)
    durations = [_seconds(rng, preset.key_len)]
    while sum(durations) < target:
      durations.append(min(_seconds(rng, preset.scene_len), target - sum(durations)))
    durations = [durations[0]] + list(rng.permutation(durations[1:]))
    key_index = int(rng.integers(len(durations)))
    durations.insert(key_index, durations.pop(0))
  else:
    count = _seconds(rng, n_scenes)
    durations = [_seconds(rng, preset.scene_len) for _ in range(count)]
    key_index = int(rng.integers(count))
  return _scene_list(rng, [int(d) for d in durations], key_index), key_index


def _detail(scenes: list[sc.Scene]) -> str:
  text = scenes[0].caption()
  for scene in scenes[1:]:
    caption = scene.caption()
    text += f" Then {caption[0].lower()}{caption[1:]}"
  return text


def _stage1(w: _Writer, preset: Preset) -> list[dict]:
  records = []
  for i in range(preset.images):
    rng = w.rng("image", i)
    scene = sc.random_scene(rng, 1.0)
    name = f"img_{i:05d}"
    sc.write_png(w.path(f"stage1/images/{name}.png"),
                 sc.draw(scene, float(rng.uniform(0, 1)), w.size, radius=w.radius))
    prompt = str(rng.choice(IMAGE_PROMPTS))
    records.append({"id": name, "image": f"images/{name}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{prompt}"},
        {"from": "gpt", "value": scene.image_caption()}]})
    w.texts.append(scene.image_caption())
  w.json("stage1/llava_images.json", records)
  rows = []
  for i in range(preset.clips):
    rng = w.rng("clip", i)
    scene = sc.random_scene(rng, _seconds(rng, preset.clip_len))
    name = f"clip_{i:05d}"
    duration = w.video(f"stage1/videos/{name}.mp4", [scene])
    rows.append({"videoid": name, "contentUrl": f"synthetic://{name}",
                 "duration": f"PT00H00M{int(duration):02d}S", "page_dir": "videos",
                 "name": scene.caption()})
    w.texts.append(scene.caption())
  with open(w.path("stage1/webvid.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["videoid", "contentUrl", "duration", "page_dir",
                                           "name"])
    writer.writeheader()
    writer.writerows(rows)
  return [{"format": "llava", "annotations": "stage1/llava_images.json",
           "media_root": "stage1"},
          {"format": "webvid", "annotations": "stage1/webvid.csv", "media_root": "stage1"}]


WALK_LENGTHS = ("preset", "scenewalk")


def _walk_durations(rng: np.random.Generator, preset: Preset, walk_lengths: str) -> list[int]:
  """A walk's scene durations (s): `preset.walk_scenes` scenes of `preset.scene_len`, or
  with walk_lengths="scenewalk" scenes of scene_len filling a total drawn from
  `scenewalk_lengths` (lognormal, mean 8 minutes, at most an hour)."""
  if walk_lengths == "preset":
    count = _seconds(rng, preset.walk_scenes)
    return [_seconds(rng, preset.scene_len) for _ in range(count)]
  target = max(1, int(round(float(scenewalk_lengths(rng, 1)[0]))))
  durations: list[int] = []
  while sum(durations) < target:
    durations.append(min(_seconds(rng, preset.scene_len), target - sum(durations)))
  return durations


def _stage2(w: _Writer, preset: Preset, walk_lengths: str = "preset") -> list[dict]:
  records = []
  for i in range(preset.walks):
    rng = w.rng("walk", i)
    scenes = _scene_list(rng, _walk_durations(rng, preset, walk_lengths), None)
    name = f"walk_{i:05d}"
    duration = w.video(f"stage2/videos/{name}.mp4", scenes)
    records.append({"video_id": name, "video": f"videos/{name}.mp4", "duration": duration,
                    "segments": [{"start": s, "end": e, "caption": scene.caption()}
                                 for (s, e), scene in zip(sc.scene_bounds(scenes), scenes)]})
    w.texts.extend(scene.caption() for scene in scenes)
  w.json("stage2/scenewalk.json", records)
  return [{"format": "scenewalk", "annotations": "stage2/scenewalk.json",
           "media_root": "stage2"}]


def _qa_records(w: _Writer, name: str, scenes: list[sc.Scene], key_index: int,
                rng: np.random.Generator) -> list[dict]:
  """LLaVA-Video records about one video: multiple choice, open QA, a detailed caption.

  Each task is asked once, in one of the two formats (the first MC_TASKS of a random order
  as multiple choice, the rest open-ended): the pipeline packs a video's records into one
  sample, and an answer given earlier in the same sample would let the model copy it from
  the text instead of reading the frames. Open-ended answers are the answer word alone
  ("orange"), as short-answer QA sets give them, so that saying what was seen is learned in
  the words the eval's options use. Which format comes first, right after the frames, is
  drawn per video."""
  video = f"videos/{name}.mp4"
  key = scenes[key_index]
  tasks = list(rng.permutation(sc.TASKS))
  open_turns, mc_turns = [], []
  for j, task in enumerate(tasks):
    question = sc.ask(key, str(task))
    if j < MC_TASKS:
      options, letter = sc.options_for(question, rng, NUM_OPTIONS)
      mc_turns.append((format_multiple_choice(question.question, options), letter))
    else:
      open_turns.append((question.question, question.answer))
  first_two = [("mc", mc_turns), ("open", open_turns)]
  if rng.random() < 0.5:
    first_two.reverse()
  detail = [(DETAIL_PROMPT, _detail(scenes))]
  records = []
  for kind, turns in (*first_two, ("detail", detail)):
    if not turns:
      continue
    conversations = []
    for j, (q, a) in enumerate(turns):
      conversations.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
      conversations.append({"from": "gpt", "value": a})
      w.texts.extend([q, a])
    records.append({"id": f"{name}_{kind}", "video": video, "conversations": conversations,
                    "data_source": "synthetic"})
  return records


def _stage3(w: _Writer, preset: Preset) -> dict[str, list[dict]]:
  sources = {}
  for split, kind, count in (("train", "qa", preset.qa_videos),
                             ("val", "qa_val", preset.qa_val_videos)):
    records = []
    for i in range(count):
      rng = w.rng(kind, i)
      scenes, key_index = _video_with_key(rng, None, preset.qa_scenes, preset)
      name = f"{kind}_{i:05d}"
      w.video(f"stage3/videos/{name}.mp4", scenes)
      records.extend(_qa_records(w, name, scenes, key_index, rng))
    suffix = "" if split == "train" else "_val"
    w.json(f"stage3/llava_video_qa{suffix}.json", records)
    sources[split] = [{"format": "llava", "annotations": f"stage3/llava_video_qa{suffix}.json",
                       "media_root": "stage3"}]
  return sources


def _eval(w: _Writer, preset: Preset) -> dict:
  records, index = [], 0
  for duration_class, length in preset.eval_len.items():
    count = (preset.eval_videos if isinstance(preset.eval_videos, int)
             else preset.eval_videos.get(duration_class, 0))
    for _ in range(count):
      rng = w.rng("eval", index)
      index += 1
      scenes, key_index = _video_with_key(rng, length, None, preset)
      video_id = f"{index:03d}"
      video_name = f"synth_{video_id}"
      duration = w.video(f"eval/videos/{video_name}.mp4", scenes)
      start, end = sc.scene_bounds(scenes)[key_index]
      needle = (end - start) <= NEEDLE_FRACTION * duration
      for j, task in enumerate(sc.TASKS):
        question = sc.ask(scenes[key_index], task)
        options, letter = sc.options_for(question, rng, NUM_OPTIONS)
        w.texts.extend([question.question, *options])
        records.append({
            "video_id": video_id, "duration": duration_class, "domain": "Synthetic",
            "sub_category": "Shapes", "url": f"synthetic://{video_name}",
            "videoID": video_name, "question_id": f"{video_id}-{j + 1}", "task_type": task,
            "question": question.question, "options": options, "answer": letter,
            "needle": bool(needle), "key_scene": [start, end], "video_seconds": duration})
  w.json("eval/videomme.json", records)
  return {
      "annotations": "eval/videomme.json", "video_root": "eval/videos",
      "num_questions": len(records), "num_options": NUM_OPTIONS,
      "chance_accuracy": 1.0 / NUM_OPTIONS,
      "needle_questions": sum(r["needle"] for r in records),
      "by_duration": {c: sum(r["duration"] == c for r in records) for c in preset.eval_len},
      "prompt": "formats.format_multiple_choice(question, options); answer: the letter",
  }


def generate(out: str, *, seed: int = 0, size: str = "tiny", frame_size: int = 64,
             video_fps: int = 4, shape_radius: float = sc.SHAPE_RADIUS,
             walk_lengths: str = "preset", **counts: int) -> dict:
  """Writes the dataset under `out` (see the module docstring); returns the manifest.

  counts: overrides of the preset's item counts (images, clips, walks, qa_videos,
  qa_val_videos, eval_videos: one count for each duration class, or a dict of them, e.g.
  {"short": 24, "medium": 8, "long": 4}).
  shape_radius: the shapes' radius as a fraction of the frame side (scenes.SHAPE_RADIUS).
  walk_lengths: "preset" (the size preset's walks) or "scenewalk" (stage-2 walk lengths
  drawn like SceneWalk's, `scenewalk_lengths`, for benchmarks; recorded in the manifest
  only then, so the default output is unchanged).
  """
  if walk_lengths not in WALK_LENGTHS:
    raise ValueError(f"walk_lengths must be one of {WALK_LENGTHS}, got {walk_lengths!r}")
  if size not in PRESETS:
    raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
  if frame_size < 16 or frame_size % 2:
    raise ValueError(f"frame_size must be an even number >= 16, got {frame_size}")
  if not 0 < shape_radius <= 0.3:
    raise ValueError(f"shape_radius must be in (0, 0.3], got {shape_radius}")
  preset = dataclasses.replace(PRESETS[size], **{k: v for k, v in counts.items()
                                                   if v is not None})
  if isinstance(preset.eval_videos, dict) and set(preset.eval_videos) - set(preset.eval_len):
    raise ValueError(f"eval_videos has unknown duration classes "
                     f"{sorted(set(preset.eval_videos) - set(preset.eval_len))}; "
                     f"known: {list(preset.eval_len)}")
  os.makedirs(out, exist_ok=True)
  w = _Writer(out, seed, frame_size, video_fps, shape_radius)
  stages = {"1": {"train": _stage1(w, preset)}, "2": {"train": _stage2(w, preset, walk_lengths)},
            "3": _stage3(w, preset)}
  eval_info = _eval(w, preset)
  tokenizer = train_tokenizer(w.texts, vocab_size=1024)
  tokenizer.save(w.path("tokenizer.json"))
  manifest = {
      "generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "frame_size": frame_size, "video_fps": video_fps,
      "shape_radius": shape_radius,
      "preset": dataclasses.asdict(preset), "sources": stages, "eval": eval_info,
      "tokenizer": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(),
      "attributes": {"shapes": list(sc.SHAPES), "colours": list(sc.COLOURS),
                     "backgrounds": list(sc.BACKGROUNDS), "motions": list(sc.MOTIONS)},
      "files": sorted(w.files) + ["manifest.json"],
  }
  if walk_lengths != "preset":
    manifest["walk_lengths"] = walk_lengths
  with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (absl, spelled as in the module docstring). Defined only when
  the module runs as a program, so that importing the generator defines none."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("out", None, "Folder to write into.", required=True, **fv)
  flags.DEFINE_integer("seed", 0, "Seed of every random stream.", **fv)
  flags.DEFINE_enum("size", "tiny", sorted(PRESETS), "Size preset.", **fv)
  flags.DEFINE_integer("frame-size", 64, "Frame side in pixels.", **fv)
  flags.DEFINE_integer("video-fps", 4, "Frame rate of the mp4s.", **fv)
  flags.DEFINE_float("shape-radius", sc.SHAPE_RADIUS, "Shape radius as a fraction of the "
                     "frame side.", **fv)
  flags.DEFINE_enum("walk-lengths", "preset", list(WALK_LENGTHS), "Stage-2 walk lengths: the "
                    "preset's, or SceneWalk-like (lognormal, mean 8 minutes, at most an hour; "
                    "for benchmarks).", **fv)
  for name in ("images", "clips", "walks", "qa-videos", "qa-val-videos", "eval-videos"):
    flags.DEFINE_integer(name, None, "Override the size preset's count.", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """app.run's main: writes the dataset the parsed flags describe and prints a summary."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  value = lambda name: flag_values[name].value
  out = value("out")
  manifest = generate(
      out, seed=value("seed"), size=value("size"), frame_size=value("frame-size"),
      video_fps=value("video-fps"), shape_radius=value("shape-radius"),
      walk_lengths=value("walk-lengths"), images=value("images"), clips=value("clips"),
      walks=value("walks"), qa_videos=value("qa-videos"),
      qa_val_videos=value("qa-val-videos"), eval_videos=value("eval-videos"))
  ev = manifest["eval"]
  print(f"wrote {len(manifest['files'])} files to {out}: "
        f"{ev['num_questions']} eval questions ({ev['num_options']} options, chance "
        f"{ev['chance_accuracy']:.0%}, {ev['needle_questions']} needle), "
        f"tokenizer vocab {manifest['vocab_size']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
