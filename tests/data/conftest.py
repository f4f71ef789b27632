"""Shared fixtures of the data tests: a tiny synthetic dataset, a word-level tokenizer with
readable ids, and a writer of small test videos whose frames encode their own index."""

import os

import av
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from ma2mba_jax.data import synthetic
from ma2mba_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

# Ids 0..4 are the special tokens (SPECIAL_TOKENS order), then these words in order.
WORDS = ["You", "are", "a", "helpful", "assistant", ".", "What", "colour", "?", "It", "is",
         "red", "blue", "circle", "square", "Describe", "the", "video", "briefly", "image",
         "Then", "moves", "left", "[UNK]"]


def _word_ids(text: str) -> list[int]:
  vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS])}
  return [vocab[w] for w in text.replace(".", " .").replace("?", " ?").split()]


@pytest.fixture
def word_ids():
  """text -> ids in the word-level test vocabulary (for writing expected lists)."""
  return _word_ids


@pytest.fixture(scope="session")
def word_tokenizer_path(tmp_path_factory):
  """tokenizer.json of a word-level tokenizer: ids 0..4 special, then WORDS."""
  vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  path = str(tmp_path_factory.mktemp("word_tokenizer") / "tokenizer.json")
  tok.save(path)
  return path


@pytest.fixture
def word_tokenizer(word_tokenizer_path):
  return load_tokenizer(word_tokenizer_path)


def _write_index_video(path, *, seconds, fps=4, width=48, height=48, codec="libx264"):
  """An mp4 whose frame i is uniformly grey at level 6*i (so decoded frames tell which
  source frame they are: index = round(pixel / 6)); at most 42 frames."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = fps  # a keyframe every second, to exercise seeking
    if codec == "libx264":
      stream.options = {"crf": "0", "preset": "ultrafast"}
    for i in range(int(seconds * fps)):
      pixels = np.full((height, width, 3), 6 * i, np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode(None))
  return str(path)


@pytest.fixture(scope="session")
def write_index_video():
  """write_index_video(path, *, seconds, fps=4, width=48, height=48, codec="libx264")."""
  return _write_index_video


def _frame_indices(frames: np.ndarray) -> list[int]:
  return [int(round(float(f.mean()) / 6)) for f in frames]


@pytest.fixture(scope="session")
def frame_indices():
  """frames decoded from a write_index_video file -> their source frame indices."""
  return _frame_indices


@pytest.fixture(scope="session")
def index_video(tmp_path_factory):
  """10 s at 4 fps (40 frames), 48x48."""
  return _write_index_video(tmp_path_factory.mktemp("videos") / "index.mp4", seconds=10)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """(folder, manifest) of the tiny synthetic dataset (64x64 frames)."""
  out = str(tmp_path_factory.mktemp("synthetic"))
  return out, synthetic.generate(out, seed=0, size="tiny", frame_size=64)
