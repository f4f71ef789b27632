"""VideoFrames: a video decoded ahead in a background thread gives the same batches as
decoding inline, raises a bad file's DataError where the consumer reads it, and stops when
closed."""

import numpy as np
import pytest

from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.video import Video, frame_times
from ma2mba_jax.data.video_prefetch import VideoFrames


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("fps,max_frames", [(1.0, None), (2.0, None), (1.0, 4)])
def test_batches_are_the_frames_at_the_grid(index_video, frame_indices, background, fps,
                                            max_frames):
  with Video(index_video) as video:  # 10 s at 4 fps
    times = frame_times(video.duration, fps=fps, max_frames=max_frames)
    expected = video.frames_at(times, 16)
  with VideoFrames(index_video, image_size=16, frames_per_batch=3, fps=fps,
                   max_frames=max_frames, max_batches=2, background=background) as frames:
    assert frames.total() == times.size
    batches = list(frames.batches())
  assert [b.shape[0] for b in batches] == [3] * (times.size // 3) + (
      [times.size % 3] if times.size % 3 else [])
  np.testing.assert_array_equal(np.concatenate(batches), expected)
  assert frame_indices(np.concatenate(batches)) == [int(np.floor(4 * t + 1e-6)) for t in times]


@pytest.mark.parametrize("background", [True, False])
def test_a_bad_file_raises_where_it_is_read(tmp_path, background):
  missing = str(tmp_path / "nope.mp4")
  frames = VideoFrames(missing, image_size=16, frames_per_batch=2, background=background)
  for _ in range(2):  # the same error again, not a hang
    with pytest.raises(DataError, match=f"{missing}: video file not found"):
      frames.total()
  frames.close()
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).bytes(5000))
  with VideoFrames(str(garbage), image_size=16, frames_per_batch=2,
                   background=background) as frames:
    with pytest.raises(DataError, match=f"{garbage}: cannot open video"):
      list(frames.batches())


def test_close_stops_the_decoder_midway(index_video):
  frames = VideoFrames(index_video, image_size=16, frames_per_batch=1, fps=4.0, max_batches=1)
  batches = frames.batches()
  first = next(batches)  # 40 frames at 4 fps, one a batch; at most one waits in the queue
  assert first.shape == (1, 16, 16, 3)
  frames.close()
  assert not frames._thread.is_alive()


def test_options_out_of_range_are_named(index_video):
  with pytest.raises(ValueError, match=r"frames_per_batch \(0\)"):
    VideoFrames(index_video, image_size=16, frames_per_batch=0)
