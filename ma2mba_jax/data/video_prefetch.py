"""A video's frames decoded ahead, in a background thread, into a bounded queue.

Inference reads a video M frames at a time; decoding them with PyAV on the thread that
dispatches the model's frame steps makes the video's time decode + model. `VideoFrames`
decodes on its own thread while the caller consumes, and can be started before the caller
needs it (evaluation starts the next video while the current one's questions are asked):

    frames = VideoFrames(path, fps=1.0, image_size=336, frames_per_batch=16)
    total = frames.total()              # frames on the fps grid; blocks until the file is open
    for batch in frames.batches():      # uint8 [<=M, S, S, 3], the same as Video.frames_at
      ...
    frames.close()                      # or `with VideoFrames(...) as frames:`

With `background=False` the same object decodes each batch when the consumer asks for it
(no thread: how inference read videos before). Memory stays bounded: at most `max_batches`
decoded batches wait in the queue (the decoder blocks when it is full). A file that is
missing or corrupt raises its DataError (naming the file) from `total()` or `batches()` in
the consumer, at the point where reading it inline would have, so a prefetch never fails
the video before it. `close()` stops the decoder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from ma2mba_jax.data.video import Video, frame_times

# Messages from the decoder thread: (kind, payload).
_TOTAL, _BATCH, _END, _ERROR = "total", "batch", "end", "error"


class VideoFrames:
  """The frames of one video at `fps` (or `max_frames` spread evenly), decoded in the
  background `frames_per_batch` at a time (see the module docstring)."""

  def __init__(self, path: str, *, image_size: int, frames_per_batch: int, fps: float = 1.0,
               max_frames: int | None = None, decode_threads: int = 0, max_batches: int = 8,
               background: bool = True):
    if frames_per_batch < 1 or max_batches < 1:
      raise ValueError(f"frames_per_batch ({frames_per_batch}) and max_batches "
                       f"({max_batches}) must be >= 1")
    self.path = path
    self.image_size, self.frames_per_batch = image_size, frames_per_batch
    self._fps, self._max_frames, self._threads = fps, max_frames, decode_threads
    self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
    self._stop = threading.Event()
    self._total: int | None = None
    self._finished = False
    self._error: BaseException | None = None
    self._messages = self._decoded()  # the decoder's messages, in order
    self._thread: threading.Thread | None = None
    if background:
      self._thread = threading.Thread(target=self._decode, name=f"decode {path}",
                                      daemon=True)
      self._thread.start()

  # ---------------------------------------------------------------- the decoder thread

  def _put(self, message: tuple[str, object]) -> bool:
    """Queues a message, waiting while the queue is full; False once close() was called."""
    while not self._stop.is_set():
      try:
        self._queue.put(message, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _decoded(self) -> Iterator[tuple[str, object]]:
    """The messages: the frame count, each batch, the end (an error ends them too)."""
    try:
      with Video(self.path, threads=self._threads) as video:
        times = frame_times(video.duration, fps=self._fps, max_frames=self._max_frames,
                            path=video.path)
        yield _TOTAL, int(times.size)
        for start in range(0, times.size, self.frames_per_batch):
          yield _BATCH, video.frames_at(times[start:start + self.frames_per_batch],
                                        self.image_size)
      yield _END, None
    except Exception as e:  # delivered to the consumer, which raises it
      yield _ERROR, e

  def _decode(self) -> None:
    for message in self._messages:
      if not self._put(message):
        break
    self._messages.close()

  # ---------------------------------------------------------------------- the consumer

  def _get(self) -> tuple[str, object]:
    if self._error is None:
      kind, payload = (self._queue.get() if self._thread is not None
                       else next(self._messages))
      if kind != _ERROR:
        return kind, payload
      self._error, self._finished = payload, True  # type: ignore[assignment]
    raise self._error

  def total(self) -> int:
    """Frames the video gives (waits until the decoder has opened the file)."""
    if self._total is None:
      kind, payload = self._get()
      assert kind == _TOTAL, kind
      self._total = int(payload)  # type: ignore[arg-type]
    return self._total

  def batches(self) -> Iterator[np.ndarray]:
    """uint8 [m, S, S, 3] batches in time order (m = frames_per_batch, the last shorter)."""
    self.total()
    while not self._finished:
      kind, payload = self._get()
      if kind == _END:
        self._finished = True
        return
      yield payload  # type: ignore[misc]

  def close(self) -> None:
    """Stops the decoder (if still running) and drops what it queued."""
    self._stop.set()
    if self._thread is None:
      self._messages.close()
      return
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()

  def __enter__(self) -> VideoFrames:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
