"""Shared fixtures of the inference tests: a small BPE tokenizer, a random tiny VideoMa2mba
(built once per session, initialised under jit: eager init is slow on CPU), a 5-second video,
and a Streamer / Sampler whose compiled steps the tests share."""

import jax
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.data import scenes
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.answering import make_sampler
from ma2mba_jax.infer.stream import Streamer
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config

TEXTS = ["You are a helpful assistant.", "What colour is the circle?", "Which shape is red?",
         "A red circle moves left on a black background.", "Which way does it move?",
         "Answer with the option's letter from the given choices directly.",
         "A. red", "B. blue", "C. green", "D. yellow", "It moves up."] * 4
# Frames read per step in the shared Streamer: the 5-frame video takes 2 full steps and
# one single-frame step, so both compiled frame shapes are exercised.
FRAMES_PER_STEP = 2
VIDEO_SECONDS = 5


@pytest.fixture(scope="session")
def tokenizer():
  return train_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
  config = video_config("tiny", llm_vocab_size=vocab_size(tokenizer), ssd_impl="xla")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VideoMa2mba(config, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(VideoMa2mba(config, rngs=nnx.Rngs(0))))()
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="session")
def video(tmp_path_factory):
  """A 5 s mp4 (32 x 32, 4 fps) of two scenes: 5 frames at 1 fps."""
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp("videos") / "two_scenes.mp4")
  scenes.write_video(path, [scenes.random_scene(rng, 2), scenes.random_scene(rng, 3)],
                     size=32, fps=4)
  return path


@pytest.fixture(scope="session")
def streamer(tiny_model, tokenizer):
  return Streamer(tiny_model, tokenizer, frames_per_step=FRAMES_PER_STEP, text_chunk=8)


@pytest.fixture(scope="session")
def sampler(tiny_model, streamer):
  return make_sampler(tiny_model, streamer)
