"""Seed sweep behind the tolerances of test_mamba2.py, test_vision.py and test_video_lm.py (a script, not a test).

  JAX_PLATFORMS=cpu python -m tests.models.model_tolerance_sweep --seeds=20

For each seed the model's parameters, tokens and cotangents are drawn anew (the test uses
seed 0); prints, per quantity, the largest error over the seeds (and the smallest, for the
bf16 check that also has a lower bound).
"""

from __future__ import annotations

from absl import app, flags

from flax import nnx

from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from tests.models import test_mamba2 as t
from tests.models import test_video_lm as tv
from tests.models import test_vision as tvis

SEEDS = flags.DEFINE_integer("seeds", 20, "how many seeds (0 .. seeds-1)")


def _sweep(name: str, errors_of) -> None:
  worst, best = {}, {}
  for seed in range(SEEDS.value):
    for key, err in errors_of(seed).items():
      worst[key] = max(worst.get(key, 0.0), err)
      best[key] = min(best.get(key, float("inf")), err)
  print(f"{name} ({SEEDS.value} seeds)")
  for key in sorted(worst):
    print(f"  {key}: max {worst[key]:.2e}  min {best[key]:.2e}")


def main(argv):
  del argv
  _sweep("modes g1", lambda s: t.mode_errors("g1", s, ("pieces", "halves")))
  _sweep("modes g2_l3", lambda s: t.mode_errors("g2_l3", s, ("halves",)))
  _sweep("chunked gradients g1", t.chunked_gradient_errors)
  _sweep("bf16 g1", t.bf16_errors)
  _sweep("vision scan vs unrolled", lambda s: {
      f"feature_layer={f}": tvis.scan_error(f, s) for f in (-2, -1, 1)})
  _sweep("vision remat", lambda s: tvis.remat_errors(s)[0])
  _sweep("vision bf16", lambda s: {"bf16_vs_f32": tvis.bf16_error(s)})
  video_model = lambda s: VideoMa2mba(video_config("tiny"), rngs=nnx.Rngs(s))
  _sweep("video_lm micro-batch remat", lambda s: tv.microbatch_remat_errors(video_model(s), s))
  _sweep("video_lm bf16 encoding", lambda s: {
      "bf16_vs_f32": tv.bf16_encoding_error(video_model(s), s)})


if __name__ == "__main__":
  app.run(main)
