"""SceneWalk-style long videos (stage 2): a JSON list / JSONL of records with "video", an
optional "duration" and "segments" [{start, end, caption}] in seconds; each segment becomes
an exchange whose span shows that part of the video (no user text)."""

from __future__ import annotations

from ma2mba_jax.data.formats import Exchange, Record, Sample, media_path
from ma2mba_jax.data.video import TIME_TOLERANCE


def parse(rec: Record, media_root: str) -> Sample:
  """One record -> a Sample (DataError naming the field when it does not fit)."""
  relative = rec.get("video")
  segments = rec.get("segments", list)
  if not segments:
    raise rec.error("field 'segments' is empty")
  duration = rec.seconds("duration") if "duration" in rec.data else None
  exchanges = []
  for i, segment in enumerate(segments):
    start = rec.seconds("start", where=segment, label=f"segments[{i}].start")
    end = rec.seconds("end", where=segment, label=f"segments[{i}].end")
    caption = rec.get("caption", where=segment, label=f"segments[{i}].caption").strip()
    if not 0 <= start < end:
      raise rec.error(f"segments[{i}] has bad times start={start} end={end}")
    if duration is not None and end > duration + TIME_TOLERANCE:
      raise rec.error(f"segments[{i}] ends at {end}s, outside the video (duration {duration}s)")
    exchanges.append(Exchange("", caption, (start, end)))
  return Sample(rec.id, rec.path, rec.index, "video", media_path(media_root, relative),
                tuple(exchanges))
