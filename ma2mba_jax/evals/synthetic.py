"""The synthetic eval set (multiple choice) that `python -m ma2mba_jax.data.synthetic`
writes: --annotations is the dataset's folder (or its manifest.json), whose "eval" entry
names a Video-MME-layout file and the video folder. Options are scored by their text
(`LIKELIHOOD_TARGET`), as the demo scores them."""

from __future__ import annotations

from ma2mba_jax.data import manifest
from ma2mba_jax.evals import MCItem, videomme

KIND = "multiple_choice"
GROUPS = videomme.GROUPS
LIKELIHOOD_TARGET = "text"


def read_items(annotations: str, *, video_root: str = "", answers: str = "") -> list[MCItem]:
  """The manifest's eval file -> MCItems (Video-MME layout)."""
  file, root = manifest.eval_files(annotations)
  return videomme.read_items(file, video_root=video_root or root, answers=answers)
