"""Smoke test of the data benchmark script (a run, not a timing)."""

import json

from absl import flags

from ma2mba_jax.bench import data as bench


def test_bench_runs_and_recommends(tmp_path, capsys):
  out = tmp_path / "bench.json"
  flag_values = flags.FlagValues()  # the command line, on flags of its own
  bench.define_flags(flag_values)
  bench.main(flag_values(["bench.data", "--seconds", "4", "--workers", "0", "--batches", "1",
                          "--image-size", "32", "--max-frames", "4", "--tokens-per-frame", "2",
                          "--json", str(out)]), flag_values)
  results = json.loads(out.read_text())
  assert results["video"] == "640x360 30 fps"
  assert results["decode"]["1_thread"]["frames"] == 4  # 4 s at 1 FPS
  assert results["pipeline"][0]["samples_per_s"] > 0
  advice = results["recommendation"]
  assert advice["frames_per_s_needed"] == 8 * bench.PAPER_TOKENS_PER_S_PER_GPU / 2
  assert advice["num_workers"] >= 1
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed[-1].startswith("GPU host: num_workers=")
  assert printed[1].split() == ["what", "frames/s", "video", "s/s", "samples/s", "startup", "s"]


def test_recommendation_arithmetic():
  advice = bench.recommend(50.0, host_tokens_per_s=14400.0, tokens_per_frame=144)
  # 100 frames/s needed, 2x headroom, 50 frames/s per worker -> 4 workers.
  assert (advice["frames_per_s_needed"], advice["num_workers"]) == (100.0, 4)
