"""synthetic.scenewalk_lengths: SceneWalk-like video lengths for the packing benchmark."""

import numpy as np

from ma2mba_jax.data import synthetic


def test_lengths_are_lognormal_with_mean_8_minutes_capped_at_an_hour():
  seconds = synthetic.scenewalk_lengths(np.random.default_rng(0), 20_000)
  assert seconds.max() <= 3600.0 and seconds.min() > 0
  assert abs(seconds.mean() - 480.0) < 0.05 * 480.0, seconds.mean()
  # lognormal: log-lengths have the configured spread (sigma 1)
  assert abs(np.log(seconds).std() - 1.0) < 0.05
  tokens = synthetic.scenewalk_lengths(np.random.default_rng(0), 20_000, max_tokens=3600)
  np.testing.assert_array_equal(tokens, np.clip(np.round(seconds), 16, 3600).astype(int))
  again = synthetic.scenewalk_lengths(np.random.default_rng(0), 20_000)
  np.testing.assert_array_equal(again, seconds)
