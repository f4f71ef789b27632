"""The synthetic set with stage-2 walks of about WALK_S seconds (for samples of 2^20 tokens
and more at 1 fps, 144 tokens a frame): `--size long` with walk_scenes set so the walks
reach that length.

  python docs/bench/issue16_h100/gen_long_walks.py WALK_S --out DIR --size long [flags of
      ma2mba_jax.data.synthetic]
"""
import dataclasses
import sys

from absl import app

from ma2mba_jax.data import synthetic

walk_s = int(sys.argv.pop(1))
scenes = -(-walk_s // 25)          # scene_len (10, 40): 25 s a scene on average
synthetic.PRESETS["long"] = dataclasses.replace(synthetic.PRESETS["long"],
                                                walk_scenes=(scenes, scenes + 10))
synthetic.define_flags()
app.run(synthetic.main)
