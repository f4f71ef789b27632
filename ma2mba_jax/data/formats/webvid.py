"""WebVid captions (stage 1): CSV / JSON / JSONL rows with "name" (the caption) and either
"video" (a path under media_root) or "page_dir" and "videoid" (page_dir/videoid.mp4).
WebVid has captions only: the user turn is VIDEO_CAPTION_PROMPT."""

from __future__ import annotations

import os

from ma2mba_jax.data.formats import (VIDEO_CAPTION_PROMPT, WHOLE, Exchange, Record, Sample,
                                     media_path)


def parse(rec: Record, media_root: str) -> Sample:
  """One record -> a Sample (DataError naming the field when it does not fit)."""
  caption = rec.get("name").strip()
  if rec.data.get("video"):
    relative = rec.get("video")
  else:
    relative = os.path.join(rec.get("page_dir"), f"{rec.get('videoid', (str, int))}.mp4")
  return Sample(rec.id, rec.path, rec.index, "video", media_path(media_root, relative),
                (Exchange(VIDEO_CAPTION_PROMPT, caption, WHOLE),))
