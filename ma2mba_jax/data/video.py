"""Video and image decoding with PyAV: frames at a target rate, resized and center-cropped.

Frames are sampled on the video's time grid 0, 1/fps, 2/fps, ... (seconds from the start of
the video stream); the frame shown at time t is the last decoded frame whose timestamp is
<= t. Frames come out as uint8 RGB, shorter side resized to `size`, then center-cropped to
`size` x `size` (the vision encoder's input; its normalisation is the model's job).

Axis legend: F frames, S output side in pixels.
"""

from __future__ import annotations

import math
import os

import av
import numpy as np

from ma2mba_jax.data.errors import DataError

# Seconds an annotation's end may overhang the video's end before it counts as "outside"
# (annotation tools round; containers and streams disagree by a frame or two).
TIME_TOLERANCE = 0.25
# When the next wanted frame is this many seconds past the decode position, seek (to the
# keyframe before it) instead of decoding every frame in between.
SEEK_GAP = 10.0
# Rounding slack when comparing frame timestamps with wanted times.
_EPS = 1e-6


def frame_times(
    duration: float,
    *,
    fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    path: str = "<video>",
) -> np.ndarray:
  """Times (seconds) of the frames to sample from a video of `duration` seconds.

  Grid points k/fps that lie in [start, end) (defaults: the whole video). An interval that
  is not empty but holds no grid point (shorter than 1/fps) gets one frame, at `start`.
  With more than `max_frames` points, `max_frames` of them are kept, spread evenly (still
  grid points). Raises DataError naming `path` for an interval outside the video.

  Returns: float64 [F], increasing.
  """
  if not fps > 0:
    raise DataError(f"{path}: fps must be > 0, got {fps}")
  if max_frames is not None and max_frames < 1:
    raise DataError(f"{path}: max_frames must be >= 1, got {max_frames}")
  start = 0.0 if start is None else float(start)
  end = float(duration) if end is None else float(end)
  if start < 0 or start >= duration:
    raise DataError(
        f"{path}: start time {start:.3f}s is outside the video (duration {duration:.3f}s)")
  if end > duration + TIME_TOLERANCE:
    raise DataError(
        f"{path}: end time {end:.3f}s is outside the video (duration {duration:.3f}s)")
  if end <= start:
    raise DataError(f"{path}: empty time interval [{start:.3f}s, {end:.3f}s)")
  end = min(end, duration)
  first = math.ceil(start * fps - _EPS)
  last = math.ceil(end * fps - _EPS)  # exclusive
  times = np.arange(first, last, dtype=np.float64) / fps
  if times.size == 0:
    times = np.array([start], dtype=np.float64)
  if max_frames is not None and times.size > max_frames:
    keep = np.round(np.linspace(0, times.size - 1, max_frames)).astype(np.int64)
    times = times[keep]
  return times


def _resize_center_crop(frame: av.VideoFrame, size: int) -> np.ndarray:
  """One decoded frame -> uint8 [S, S, 3] RGB (shorter side to `size`, center crop)."""
  width, height = frame.width, frame.height
  scale = size / min(width, height)
  new_w = max(size, round(width * scale))
  new_h = max(size, round(height * scale))
  rgb = frame.reformat(width=new_w, height=new_h, format="rgb24", interpolation="BILINEAR")
  pixels = rgb.to_ndarray()  # [new_h, new_w, 3]
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  return np.ascontiguousarray(pixels[top:top + size, left:left + size])


class Video:
  """An open video file: its duration, and its frames at chosen times.

  Use as a context manager (`with Video(path) as video: ...`) so the file is closed.
  threads: decoder threads (0: FFmpeg picks, about one per core; data-loader workers
  should use 1 and get their parallelism from the number of workers).
  Raises DataError naming the file when it is missing, not a video, or corrupt.
  """

  def __init__(self, path: str, *, threads: int = 0):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: video file not found")
    try:
      self._container = av.open(self.path)
    except (av.FFmpegError, OSError) as e:
      raise DataError(f"{self.path}: cannot open video ({e})") from e
    if not self._container.streams.video:
      self._container.close()
      raise DataError(f"{self.path}: no video stream in file")
    self._stream = self._container.streams.video[0]
    self._stream.codec_context.thread_count = threads
    if threads != 1:
      self._stream.thread_type = "AUTO"
    self._time_base = self._stream.time_base
    self._start_pts = self._stream.start_time or 0
    rate = self._stream.average_rate
    self._frame_interval = 1.0 / float(rate) if rate else 0.0
    self.duration = self._probe_duration()

  def _probe_duration(self) -> float:
    stream, container = self._stream, self._container
    if stream.duration and self._time_base:
      return float(stream.duration * self._time_base)
    if container.duration:
      return container.duration / av.time_base
    if stream.frames and stream.average_rate:
      return stream.frames / float(stream.average_rate)
    raise DataError(f"{self.path}: cannot determine the video's duration")

  def __enter__(self) -> Video:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._container.close()

  def _frame_time(self, frame: av.VideoFrame) -> float:
    """Seconds from the start of the stream."""
    return float((frame.pts - self._start_pts) * self._time_base)

  def _decode_from(self, t: float):
    """Frames from the keyframe at or before time `t` on."""
    offset = self._start_pts + int(max(t, 0.0) / self._time_base)
    self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
    for frame in self._container.decode(self._stream):
      if frame.pts is not None:
        yield frame

  def frames_at(self, times: np.ndarray, size: int) -> np.ndarray:
    """The frames shown at `times` (seconds, any order): uint8 [F, S, S, 3]."""
    times = np.asarray(times, dtype=np.float64)
    out = np.empty((times.size, size, size, 3), dtype=np.uint8)
    order = np.argsort(times, kind="stable")
    wanted = times[order]
    j = 0  # next entry of `wanted` to fill
    try:
      while j < wanted.size:
        prev, prev_pixels, reseek = None, None, False
        seeked_for = j  # never seek again before reaching this target: no seek loops
        for frame in self._decode_from(wanted[j]):
          t = self._frame_time(frame)
          # `prev` is the frame on screen for every wanted time before this frame's time.
          while j < wanted.size and wanted[j] < t - _EPS:
            if prev is None:  # wanted time before the first frame: show the first frame
              prev = frame
            if prev_pixels is None:
              prev_pixels = _resize_center_crop(prev, size)
            out[order[j]] = prev_pixels
            j += 1
          if j == wanted.size:
            break
          prev, prev_pixels = frame, None
          if j > seeked_for and wanted[j] - t > SEEK_GAP:
            reseek = True
            break
        if j == wanted.size or reseek:
          continue
        # The stream ended: its last frame stays on screen until the video's end, but a
        # wanted time well past it means the file holds fewer frames than it claims.
        last_t = self._frame_time(prev) if prev is not None else 0.0
        if prev is None or wanted[-1] - last_t > self._frame_interval + TIME_TOLERANCE:
          raise DataError(
              f"{self.path}: no frame at {wanted[-1]:.3f}s; decoding stopped at {last_t:.3f}s "
              f"(duration {self.duration:.3f}s; truncated or corrupt file?)")
        out[order[j:]] = _resize_center_crop(prev, size)
        j = wanted.size
    except av.FFmpegError as e:
      raise DataError(f"{self.path}: corrupt video, decoding failed ({e})") from e
    return out


def decode_video(
    path: str,
    *,
    fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    size: int = 224,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a video at `fps` frames per second within [start, end).

  Returns (frames uint8 [F, S, S, 3], timestamps float64 [F] in seconds); see
  `frame_times` for which timestamps; `threads` as for `Video`. Raises DataError naming
  the file.
  """
  with Video(path, threads=threads) as video:
    times = frame_times(
        video.duration, fps=fps, start=start, end=end, max_frames=max_frames, path=video.path)
    return video.frames_at(times, size), times


def load_image(path: str, size: int = 224) -> np.ndarray:
  """An image file (JPEG, PNG, ...) as uint8 [S, S, 3] RGB, resized and center-cropped."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: image file not found")
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise DataError(f"{path}: not an image")
      for frame in container.decode(video=0):
        return _resize_center_crop(frame, size)
  except av.FFmpegError as e:
    raise DataError(f"{path}: cannot decode image ({e})") from e
  raise DataError(f"{path}: image holds no picture")


def probe_media(path: str, media: str = "video") -> str | None:
  """Checks that a media file reads, cheaply: None when it does, else the reason (a
  DataError message naming the file). media 'video': opens the header once (container,
  a video stream, its duration; no frame decoded). 'image': decodes the picture (an image
  has no header that tells a corrupt file apart)."""
  try:
    if media == "video":
      with Video(path, threads=1):
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
      return f"{path}: image file not found"
    try:
      with av.open(path) as container:
        if not container.streams.video:
          return f"{path}: not an image"
        for _ in container.decode(video=0):
          return None
    except (av.FFmpegError, OSError) as e:
      return f"{path}: cannot decode image ({e})"
    return f"{path}: image holds no picture"
  except DataError as e:
    return str(e)
