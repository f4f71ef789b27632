"""Procedural scenes for the synthetic dataset: drawing, encoding, and truthful text.

A scene is one shape of one colour on a plain background, moving one way (or still) for a
few seconds. Everything a caption or answer says is visible in the frames: the shape's
kind and colour and the background are in every frame, the motion in any two frames a
second apart (the shape crosses 60% of the frame per scene).

Axis legend: S frame side (pixels).
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

# Four of each attribute a question can ask about (motions: five), so that every
# multiple-choice question has four options and chance is 25%.
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "brown": (110, 70, 40),
}
MOTIONS = ("left", "right", "up", "down", "still")
# The shape's radius as a fraction of the frame side (before the scene's `scale`).
SHAPE_RADIUS = 0.14
# No B-frames and no lookahead (so no macroblock tree): with them, libx264 (core 165, PyAV
# 19) reads memory it never wrote, and the same frames encode to different bytes depending on
# what the process's heap held before (tests/data/test_synthetic.py shows it with
# MALLOC_PERTURB_). Without them the bytes depend on the frames alone.
X264_PARAMS = "bframes=0:rc-lookahead=0:mbtree=0"
# Where the shape's centre goes over a scene, as fractions of the frame (x, y; y down).
_PATHS = {
    "left": ((0.8, 0.5), (0.2, 0.5)),
    "right": ((0.2, 0.5), (0.8, 0.5)),
    "up": ((0.5, 0.8), (0.5, 0.2)),
    "down": ((0.5, 0.2), (0.5, 0.8)),
    "still": ((0.5, 0.5), (0.5, 0.5)),
}


@dataclasses.dataclass(frozen=True)
class Scene:
  """One scene. offset: shift of the path across the motion (fraction of the frame),
  scale: shape size factor; both vary the pixels without changing any caption."""
  shape: str
  colour: str
  background: str
  motion: str
  duration: float
  offset: float = 0.0
  scale: float = 1.0

  def caption(self) -> str:
    """What happens, e.g. 'A red circle moves left on a black background.'"""
    verb = "stays still" if self.motion == "still" else f"moves {self.motion}"
    return f"{self._subject()} {verb} on a {self.background} background."

  def image_caption(self) -> str:
    """What one frame shows (no motion), e.g. 'A red circle on a black background.'"""
    return f"{self._subject()} on a {self.background} background."

  def _subject(self) -> str:
    article = "An" if self.colour[0] in "aeiou" else "A"
    return f"{article} {self.colour} {self.shape}"


def random_scene(rng: np.random.Generator, duration: float, *, shapes=SHAPES,
                 colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS),
                 motions=MOTIONS) -> Scene:
  """A scene with attributes drawn uniformly from the given choices."""
  return Scene(
      shape=str(rng.choice(shapes)), colour=str(rng.choice(colours)),
      background=str(rng.choice(backgrounds)), motion=str(rng.choice(motions)),
      duration=float(duration), offset=float(rng.uniform(-0.12, 0.12)),
      scale=float(rng.uniform(0.85, 1.15)))


def draw(scene: Scene, progress: float, size: int, *, radius: float = SHAPE_RADIUS
         ) -> np.ndarray:
  """The frame at `progress` in [0, 1] through the scene: uint8 [S, S, 3]; the shape's
  radius is `radius` x the frame side x the scene's scale."""
  (x0, y0), (x1, y1) = _PATHS[scene.motion]
  cx = (x0 + (x1 - x0) * progress) * size
  cy = (y0 + (y1 - y0) * progress) * size
  if scene.motion in ("left", "right", "still"):
    cy += scene.offset * size
  else:
    cx += scene.offset * size
  r = radius * size * scene.scale
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = xx - cx, yy - cy
  if scene.shape == "circle":
    mask = dx * dx + dy * dy <= r * r
  elif scene.shape == "square":
    mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  elif scene.shape == "diamond":
    mask = np.abs(dx) + np.abs(dy) <= 1.15 * r
  elif scene.shape == "triangle":  # apex up, base at the bottom
    mask = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
  else:
    raise ValueError(f"unknown shape {scene.shape!r}")
  frame = np.empty((size, size, 3), np.uint8)
  frame[:] = BACKGROUNDS[scene.background]
  frame[mask] = COLOURS[scene.colour]
  return frame


def scene_bounds(scenes: list[Scene]) -> list[tuple[float, float]]:
  """(start, end) seconds of each scene played one after another."""
  bounds, t = [], 0.0
  for scene in scenes:
    bounds.append((t, t + scene.duration))
    t += scene.duration
  return bounds


def write_video(path: str, scenes: list[Scene], *, size: int, fps: int,
                radius: float = SHAPE_RADIUS) -> float:
  """Encodes the scenes one after another into an mp4 (H.264 when available, else
  MPEG-4 Part 2) at `fps` frames per second; returns the duration in seconds. Scene
  durations must be whole multiples of 1/fps."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    # One thread: byte-identical files for a seed. Short GOPs: cheap seeking.
    stream.codec_context.thread_count = 1
    stream.codec_context.gop_size = 2 * fps
    if codec == "libx264":
      stream.options = {"crf": "18", "preset": "veryfast", "x264-params": X264_PARAMS}
    else:
      stream.codec_context.bit_rate = 400_000
    frames = 0
    for scene in scenes:
      count = round(scene.duration * fps)
      for i in range(count):
        pixels = draw(scene, i / count, size, radius=radius)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
      frames += count
    container.mux(stream.encode(None))
  return frames / fps


def write_png(path: str, pixels: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] RGB as a PNG file (PyAV's PNG encoder)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  codec = av.CodecContext.create("png", "w")
  codec.height, codec.width = pixels.shape[:2]
  codec.pix_fmt = "rgb24"
  packets = codec.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24"))
  packets += codec.encode(None)
  with open(path, "wb") as f:
    for packet in packets:
      f.write(bytes(packet))


# ---------------------------------------------------------------------------------------
# Questions about the key scene of a video: its shape and its colour appear in no other
# scene, so "the triangle" or "the red shape" names exactly one scene.

TASKS = ("colour", "shape", "background", "motion")


@dataclasses.dataclass(frozen=True)
class Question:
  """A question with its open-ended answer, the one-word answer, and the word choices."""
  task: str
  question: str
  answer_text: str
  answer: str
  choices: tuple[str, ...]


def ask(key: Scene, task: str) -> Question:
  """The question of type `task` about the key scene."""
  if task == "colour":
    return Question(task, f"What colour is the {key.shape}?",
                    f"The {key.shape} is {key.colour}.", key.colour, tuple(COLOURS))
  if task == "shape":
    return Question(task, f"Which shape is {key.colour}?",
                    f"The {key.colour} shape is a {key.shape}.", key.shape, SHAPES)
  if task == "background":
    return Question(task, f"What is the background colour when the {key.shape} appears?",
                    f"The background is {key.background}.", key.background,
                    tuple(BACKGROUNDS))
  if task == "motion":
    text = (f"The {key.shape} stays still." if key.motion == "still"
            else f"The {key.shape} moves {key.motion}.")
    return Question(task, f"Which way does the {key.shape} move?", text, key.motion, MOTIONS)
  raise ValueError(f"unknown task {task!r}")


def options_for(question: Question, rng: np.random.Generator,
                num_options: int = 4) -> tuple[list[str], str]:
  """Shuffled options ["A. red", ...] holding the answer, and the answer's letter."""
  distractors = [c for c in question.choices if c != question.answer]
  picked = list(rng.choice(distractors, size=num_options - 1, replace=False))
  words = [question.answer] + [str(w) for w in picked]
  rng.shuffle(words)
  letters = "ABCDEFGH"[:num_options]
  options = [f"{letter}. {word}" for letter, word in zip(letters, words)]
  return options, letters[words.index(question.answer)]
