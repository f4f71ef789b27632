"""Decoding: frame counts, timestamps and the right frames; resizing; errors naming the file."""

import av
import numpy as np
import pytest

from ma2mba_jax.data import video as video_lib
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.scenes import write_png
from ma2mba_jax.data.video import Video, decode_video, frame_times, load_image


def test_one_fps_gives_one_frame_per_second(index_video, frame_indices):
  frames, times = decode_video(index_video, fps=1.0, size=32)
  assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(times, np.arange(10.0))
  # At 4 fps, the frame shown at t seconds is source frame 4t.
  assert frame_indices(frames) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]


@pytest.mark.parametrize("fps,start,end,expected_times", [
    (2.0, None, None, [i / 2 for i in range(20)]),
    (0.5, None, None, [0.0, 2.0, 4.0, 6.0, 8.0]),
    (1.0, 2.5, 7.1, [3.0, 4.0, 5.0, 6.0, 7.0]),
    (1.0, 3.0, 5.0, [3.0, 4.0]),  # [start, end): 5.0 excluded
    (1.0, 9.0, None, [9.0]),
    (1.0, 4.2, 4.8, [4.2]),  # no grid point inside: one frame at start
    (3.0, 0.0, 1.0, [0.0, 1 / 3, 2 / 3]),  # between source frames: the one on screen
])
def test_rates_and_windows(index_video, frame_indices, fps, start, end, expected_times):
  frames, times = decode_video(index_video, fps=fps, start=start, end=end, size=16)
  np.testing.assert_allclose(times, expected_times)
  # The frame on screen at t is source frame floor(4t).
  assert frame_indices(frames) == [int(np.floor(4 * t + 1e-6)) for t in expected_times]


def test_max_frames_spreads_over_the_grid(index_video, frame_indices):
  frames, times = decode_video(index_video, fps=1.0, max_frames=4, size=16)
  np.testing.assert_array_equal(times, [0.0, 3.0, 6.0, 9.0])
  assert frame_indices(frames) == [0, 12, 24, 36]


def test_seeking_gives_the_same_frames(index_video, monkeypatch):
  times = np.array([0.0, 0.5, 6.25, 9.75, 2.0])  # out of order on purpose
  with Video(index_video) as video:
    linear = video.frames_at(times, 16)
  monkeypatch.setattr(video_lib, "SEEK_GAP", 0.4)
  seeks = []
  decode_from = Video._decode_from
  monkeypatch.setattr(Video, "_decode_from", lambda self, t: seeks.append(t) or decode_from(self, t))
  with Video(index_video) as video:
    seeking = video.frames_at(times, 16)
    again = video.frames_at(times[::-1], 16)  # a second call on the same open file
  np.testing.assert_array_equal(linear, seeking)
  np.testing.assert_array_equal(seeking[::-1], again)
  # One seek per far target (keyframes every second, so 9.75 needs decoding from 9.0).
  assert seeks == [0.0, 2.0, 6.25, 9.75] * 2


def test_shorter_side_resize_and_center_crop(tmp_path, write_index_video):
  path = write_index_video(tmp_path / "wide.mp4", seconds=1, width=96, height=48)
  frames, _ = decode_video(path, size=24)
  assert frames.shape == (1, 24, 24, 3)
  # A landscape frame: the crop keeps the middle half of the width; check on an image.
  pixels = np.zeros((48, 96, 3), np.uint8)
  pixels[:, :24] = (255, 0, 0)  # left quarter: cropped away
  pixels[:, 24:72] = (0, 0, 255)  # middle half: kept
  pixels[:, 72:] = (0, 255, 0)  # right quarter: cropped away
  write_png(str(tmp_path / "wide.png"), pixels)
  image = load_image(str(tmp_path / "wide.png"), 24)
  assert image.shape == (24, 24, 3)
  assert image[:, 1:-1, 2].min() > 200 and image[:, 1:-1, :2].max() < 60


def test_mpeg4_files_decode(tmp_path, write_index_video, frame_indices):
  path = write_index_video(tmp_path / "m4.mp4", seconds=3, codec="mpeg4")
  frames, times = decode_video(path, size=16)
  np.testing.assert_array_equal(times, [0.0, 1.0, 2.0])
  assert frame_indices(frames) == [0, 4, 8]


def test_missing_video_names_the_file(tmp_path):
  path = str(tmp_path / "nope.mp4")
  with pytest.raises(DataError, match=f"{path}: video file not found"):
    decode_video(path)


def test_corrupt_video_names_the_file(tmp_path, index_video):
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(DataError, match=f"{garbage}: cannot open video"):
    decode_video(str(garbage))
  # Cut off the end: the index (moov box, written last) is gone.
  truncated = tmp_path / "truncated.mp4"
  with open(index_video, "rb") as f:
    truncated.write_bytes(f.read()[:2000])
  with pytest.raises(DataError, match=f"{truncated}: cannot open video"):
    decode_video(str(truncated))


def test_video_cut_short_names_the_file(tmp_path):
  # Index first (faststart), then half the frame data: opens, but frames run out.
  path = tmp_path / "faststart.mp4"
  with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("libx264", rate=4)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(40):  # noise: frames of similar size, so half the bytes is ~half the video
      pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode(None))
  data = path.read_bytes()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=f"{cut}: no frame at 9.000s; decoding stopped at"):
    decode_video(str(cut))


@pytest.mark.parametrize("start,end,message", [
    (12.0, None, "start time 12.000s is outside the video"),
    (-1.0, None, "start time -1.000s is outside the video"),
    (2.0, 30.0, "end time 30.000s is outside the video"),
    (5.0, 5.0, "empty time interval"),
])
def test_times_outside_the_video_name_the_file(index_video, start, end, message):
  with pytest.raises(DataError, match=f"{index_video}: {message}"):
    decode_video(index_video, start=start, end=end)


def test_end_within_tolerance_is_clamped():
  np.testing.assert_array_equal(frame_times(10.0, end=10.2), np.arange(10.0))


def test_image_loading_and_errors(tmp_path):
  pixels = np.zeros((40, 40, 3), np.uint8)
  pixels[...] = (10, 200, 30)
  write_png(str(tmp_path / "green.png"), pixels)
  image = load_image(str(tmp_path / "green.png"), 16)
  assert image.shape == (16, 16, 3)
  np.testing.assert_array_equal(image[8, 8], [10, 200, 30])
  with pytest.raises(DataError, match="nope.png: image file not found"):
    load_image(str(tmp_path / "nope.png"), 16)
  (tmp_path / "bad.png").write_bytes(b"not an image at all")
  with pytest.raises(DataError, match="bad.png: cannot decode image"):
    load_image(str(tmp_path / "bad.png"), 16)
