"""LLaVA conversations (stages 1 and 3): a JSON list / JSONL of records with "image" or
"video" (a path under media_root) and "conversations", alternating {"from": "human" |
"gpt", "value": ...} turns. <image> / <video> tags are dropped from the text; the frames go
before the first question (the paper's layout), wherever the tag stood."""

from __future__ import annotations

from ma2mba_jax.data.formats import WHOLE, Exchange, Record, Sample, media_path, strip_media_tags


def parse(rec: Record, media_root: str) -> Sample:
  """One record -> a Sample (DataError naming the field when it does not fit)."""
  if "image" in rec.data:
    media, relative = "image", rec.get("image")
  elif "video" in rec.data:
    media, relative = "video", rec.get("video")
  else:
    raise rec.error("missing field 'image' or 'video'")
  turns = rec.get("conversations", list)
  if len(turns) < 2 or len(turns) % 2:
    raise rec.error(f"field 'conversations' should alternate human and gpt turns, "
                    f"got {len(turns)} turns")
  values = []
  for j, turn in enumerate(turns):
    role = "human" if j % 2 == 0 else "gpt"
    if rec.get("from", where=turn, label=f"conversations[{j}].from") != role:
      raise rec.error(f"field 'conversations[{j}].from' should be '{role}'")
    values.append(rec.get("value", where=turn, label=f"conversations[{j}].value"))
  exchanges = []
  for i in range(0, len(turns), 2):
    question = strip_media_tags(values[i])
    answer = values[i + 1].strip()
    # Frames go before the first question (the paper's layout), whatever the tag's place.
    exchanges.append(Exchange(question, answer, WHOLE if i == 0 else None))
  return Sample(rec.id, rec.path, rec.index, media, media_path(media_root, relative),
                tuple(exchanges))
