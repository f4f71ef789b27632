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


def test_walk_durations_default_unchanged_and_scenewalk_fills_its_length():
  preset = synthetic.PRESETS["tiny"]
  a, b = np.random.default_rng([0, 3, 1]), np.random.default_rng([0, 3, 1])
  # The default draws exactly what the generator always drew (so its output is unchanged).
  count = int(b.integers(preset.walk_scenes[0], preset.walk_scenes[1] + 1))
  want = [int(b.integers(preset.scene_len[0], preset.scene_len[1] + 1)) for _ in range(count)]
  assert synthetic._walk_durations(a, preset, "preset") == want
  for seed in range(5):
    rng, ref = np.random.default_rng(seed), np.random.default_rng(seed)
    durations = synthetic._walk_durations(rng, preset, "scenewalk")
    target = max(1, int(round(float(synthetic.scenewalk_lengths(ref, 1)[0]))))
    assert sum(durations) == target and all(d >= 1 for d in durations)
    assert max(durations) <= preset.scene_len[1]
