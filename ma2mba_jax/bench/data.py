"""Data-side throughput: PyAV decode frames/s and Grain pipeline samples/s on this machine,
and the worker settings a GPU host needs so that training is not starved.

    python -m ma2mba_jax.bench.data [--video PATH] [--seconds 60] [--workers 0,1,2]
        [--image-size 336] [--host-tokens-per-s 63000] [--json out.json]

Without --video it writes a 640x360, 30 fps H.264 test video of drawn scenes (typical of
web video) into a temp folder. It measures
  decode    1-FPS frames out of the video, resized and cropped to --image-size, per second,
            with one decoder thread and with FFmpeg's threads on all cores, and how many
            seconds of video that is per second;
  pipeline  the full make_pipeline (stage 2 layout: clips of the test video with captions,
            tokenised, batched) with each --workers setting: samples/s and frames/s.
Then it sizes the loader for a host: the model consumes --host-tokens-per-s tokens
(default: 8 GPUs x 7,914 tok/s, the paper's 2.7B MA-GC rate on A100), i.e.
tokens / tokens_per_frame frames/s; workers = that / (frames/s one worker decodes), with
2x headroom. The table is printed last.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence

import av
import numpy as np
from absl import app, flags

from ma2mba_jax.data import scenes as sc
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import train_tokenizer
from ma2mba_jax.data.video import Video, decode_video

PAPER_TOKENS_PER_S_PER_GPU = 7914  # 2.7B, MA-GC at 2^19 tokens, A100 (paper)
HEADROOM = 2.0


def write_test_video(path: str, seconds: int, *, width: int = 640, height: int = 360,
                     fps: int = 30, scene_seconds: int = 10) -> list[sc.Scene]:
  """A width x height H.264 video of drawn scenes (square scene art, letterboxed)."""
  rng = np.random.default_rng(0)
  scene_seconds = min(scene_seconds, seconds)
  scenes = [sc.random_scene(rng, scene_seconds) for _ in range(math.ceil(seconds / scene_seconds))]
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                   rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = 2 * fps
    canvas = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    for scene in scenes:
      count = scene_seconds * fps
      for i in range(count):
        canvas[:, left:left + height] = sc.draw(scene, i / count, height)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
    container.mux(stream.encode(None))
  return scenes


def bench_decode(path: str, *, image_size: int, threads: int, repeats: int = 2) -> dict:
  """Best of `repeats` full 1-FPS decodes of `path` with `threads` decoder threads."""
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    frames, times = decode_video(path, fps=1.0, size=image_size, threads=threads)
    best = min(best, time.perf_counter() - start)
  video_seconds = float(times[-1]) + 1.0
  return {"frames": int(frames.shape[0]), "seconds": best,
          "frames_per_s": frames.shape[0] / best, "video_s_per_s": video_seconds / best}


def _scenewalk(folder: str, video: str, scenes: list[sc.Scene], clips_per_sample: int) -> str:
  """SceneWalk annotations: consecutive windows of `clips_per_sample` scenes of the video."""
  bounds = sc.scene_bounds(scenes)
  records = []
  for first in range(0, len(scenes) - clips_per_sample + 1):
    records.append({"video_id": f"w{first}", "video": video, "segments": [
        {"start": s, "end": e, "caption": scene.caption()}
        for (s, e), scene in zip(bounds[first:first + clips_per_sample],
                                 scenes[first:first + clips_per_sample])]})
  path = os.path.join(folder, "bench_scenewalk.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def bench_pipeline(annotations: str, tokenizer, *, workers: int, image_size: int,
                   tokens_per_frame: int, max_frames: int, batches: int) -> dict:
  """Samples/s and frames/s of make_pipeline after its first batch (startup excluded)."""
  config = {"stage": 2, "sources": {"train": [{"format": "scenewalk",
                                               "annotations": annotations}]},
            "image_size": image_size, "tokens_per_frame": tokens_per_frame,
            "max_frames": max_frames, "max_tokens": max_frames * tokens_per_frame + 512,
            "batch_size": 2, "num_workers": workers, "worker_buffer_size": 2, "seed": 0}
  it = iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1))
  start = time.perf_counter()
  next(it)
  startup = time.perf_counter() - start
  start = time.perf_counter()
  samples = frames = 0
  for _ in range(batches):
    batch = next(it)
    samples += int((batch["segment_ids"].max(axis=1) > 0).sum())
    frames += int(batch["frame_mask"].sum())
  elapsed = time.perf_counter() - start
  it.close()
  return {"workers": workers, "startup_s": startup, "samples_per_s": samples / elapsed,
          "frames_per_s": frames / elapsed}


def recommend(per_worker_frames_per_s: float, *, host_tokens_per_s: float,
              tokens_per_frame: int) -> dict:
  """Loader settings for a host whose model consumes `host_tokens_per_s` tokens/s."""
  need = host_tokens_per_s / tokens_per_frame
  workers = max(1, math.ceil(HEADROOM * need / per_worker_frames_per_s))
  return {"frames_per_s_needed": need, "num_workers": workers, "worker_buffer_size": 2,
          "read_threads": 1,
          "note": (f"{need:.0f} frames/s at {host_tokens_per_s:.0f} tokens/s; one worker "
                   f"decodes {per_worker_frames_per_s:.0f} frames/s here; {HEADROOM:.0f}x "
                   "headroom. More workers than CPU cores - 2 will not help: beyond that, "
                   "pre-extract 1-FPS frames or lower the source resolution.")}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (absl, spelled as in the module docstring); defined only when
  the module runs as a program."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("video", None, "An mp4 to decode (default: write a 640x360 test "
                      "video).", **fv)
  flags.DEFINE_integer("seconds", 60, "Length of the test video.", **fv)
  flags.DEFINE_integer("image-size", 336, "Frame side the pipeline resizes to.", **fv)
  flags.DEFINE_integer("tokens-per-frame", 144, "Vision tokens per frame.", **fv)
  flags.DEFINE_integer("max-frames", 32, "Frames per pipeline sample.", **fv)
  flags.DEFINE_string("workers", "0,1,2", "Comma-separated num_workers to try.", **fv)
  flags.DEFINE_integer("batches", 4, "Timed batches per setting.", **fv)
  flags.DEFINE_float("host-tokens-per-s", 8 * PAPER_TOKENS_PER_S_PER_GPU, "Training "
                     "tokens/s of the GPU host the pipeline feeds.", **fv)
  flags.DEFINE_string("json", None, "Write the results here.", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """app.run's main: runs `run` with the parsed flags."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  value = lambda name: flag_values[name].value
  run(video=value("video"), seconds=value("seconds"), image_size=value("image-size"),
      tokens_per_frame=value("tokens-per-frame"), max_frames=value("max-frames"),
      workers=value("workers"), batches=value("batches"),
      host_tokens_per_s=value("host-tokens-per-s"), json_path=value("json"))


def run(*, video: str | None = None, seconds: int = 60, image_size: int = 336,
        tokens_per_frame: int = 144, max_frames: int = 32, workers: str = "0,1,2",
        batches: int = 4, host_tokens_per_s: float = 8 * PAPER_TOKENS_PER_S_PER_GPU,
        json_path: str | None = None) -> dict:
  """Decodes a video (`video`, or a written test video of `seconds`), runs the pipeline with
  each num_workers in `workers`, prints the table and the recommendation and returns them
  (written to `json_path` too when given)."""
  with tempfile.TemporaryDirectory() as folder:
    path = video or os.path.join(folder, "bench.mp4")
    if video:  # ~10 s "scenes" with placeholder captions: only their length matters
      with Video(path) as opened:
        count = max(1, int(opened.duration // 10))
        scenes = [sc.Scene("circle", "red", "black", "still", opened.duration / count)] * count
    else:
      scenes = write_test_video(path, seconds)
    with av.open(path) as container:
      stream = container.streams.video[0]
      source = f"{stream.width}x{stream.height} {float(stream.average_rate):.0f} fps"
    decodes = {threads: bench_decode(path, image_size=image_size, threads=threads)
               for threads in (1, 0)}
    tokenizer = train_tokenizer([s.caption() for s in scenes], vocab_size=512)
    annotations = _scenewalk(folder, path, scenes, clips_per_sample=min(3, len(scenes)))
    pipelines = [bench_pipeline(annotations, tokenizer, workers=int(w),
                                image_size=image_size,
                                tokens_per_frame=tokens_per_frame,
                                max_frames=max_frames, batches=batches)
                 for w in workers.split(",")]
  # One worker = one core decoding single-threaded, plus tokenising and batching.
  per_worker = min(decodes[1]["frames_per_s"],
                   next((p["frames_per_s"] for p in pipelines if p["workers"] == 0),
                        decodes[1]["frames_per_s"]))
  advice = recommend(per_worker, host_tokens_per_s=host_tokens_per_s,
                     tokens_per_frame=tokens_per_frame)
  results = {"machine": {"cpu_count": os.cpu_count()}, "video": source,
             "image_size": image_size,
             "decode": {"1_thread": decodes[1], "all_cores": decodes[0]}, "pipeline": pipelines,
             "recommendation": advice}
  if json_path:
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)

  print(f"source video {source}, frames to {image_size}px at 1 FPS, "
        f"{os.cpu_count()} CPU cores")
  print(f"{'what':<24}{'frames/s':>10}{'video s/s':>11}{'samples/s':>11}{'startup s':>11}")
  for threads, name in ((1, "decode, 1 thread"), (0, "decode, all cores")):
    d = decodes[threads]
    print(f"{name:<24}{d['frames_per_s']:>10.1f}{d['video_s_per_s']:>11.1f}{'-':>11}{'-':>11}")
  for p in pipelines:
    print(f"{'pipeline, workers=' + str(p['workers']):<24}{p['frames_per_s']:>10.1f}"
          f"{p['frames_per_s']:>11.1f}{p['samples_per_s']:>11.2f}{p['startup_s']:>11.1f}")
  print(f"GPU host: num_workers={advice['num_workers']} worker_buffer_size="
        f"{advice['worker_buffer_size']} read_threads={advice['read_threads']} "
        f"({advice['note']})")
  return results


if __name__ == "__main__":
  define_flags()
  app.run(main)
