"""Real (non-padding) tokens/s of a training step on a mixed-length set: every batch padded
to max_tokens, length buckets, and packing (issue 17).

    python -m ma2mba_jax.bench.packing [--model tiny] [--max_tokens 2048] [--examples 48]
        [--batch 4] [--repeats 2] [--modes padded,buckets,packing] [--padded_batches 0]
        [--bucket_multiple 256] [--bucket_ratio 2] [--pack_window 16]
        [--compute_dtype bfloat16] [--json packing.json]

The examples are text only (random tokens, every token a target), with lengths drawn like
SceneWalk's videos (`synthetic.scenewalk_lengths`: lognormal, mean 8 minutes, at most an
hour) scaled so that an hour is max_tokens. The batches come from the data pipeline's own
batcher (`PadBatchIterDataset`) in each mode; each distinct batch shape is compiled (and
run once) before the timing, so the compiles are counted, not timed. The step is the
training forward + backward (`train.step.loss_sums` under MA-GC, then its gradient); the
optimizer update is left out (the same in every mode).

Columns: real tok/s counts non-padding tokens only; "vs padded" divides it by the padded
mode's real tok/s (today's default), "vs fixed" by the fixed-length rate, the padded mode's
padded tok/s (what the step does when every row is a real max_tokens example).
With --padded_batches K the padded modes time only their first K batches (every one of
them has the same shape, so the same cost) and give the time of all of them as K's mean
times their number; the other modes time every batch.

Modes:
  padded          one example a row, every row max_tokens long (today's default)
  padded+resets   the same batches with the packed step (resets derived from segment_ids):
                  the cost of the resets when every row is one segment
  buckets         one example a row, each batch cut to the smallest bucket
                  (`batching.bucket_ladder(max_tokens, --bucket_multiple, --bucket_ratio)`)
  packing         examples packed into rows of max_tokens from a lookahead window of
                  --pack_window examples (oldest first, then best fit: data.pack_window),
                  resets at their starts
  packing_greedy  the same with a window of 1: greedy, in order (a row ends at the first
                  example that does not fit; the packer before data.pack_window)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODES = ("padded", "padded+resets", "buckets", "packing", "packing_greedy")
PACKED_MODES = ("padded+resets", "packing", "packing_greedy")


class _TextModel(nnx.Module):
  """What loss_sums needs of the video model, text only: embed_inputs and llm."""

  def __init__(self, llm):
    self.llm = llm

  def embed_inputs(self, tokens, vision_index, frames, frame_mask):
    del vision_index, frames, frame_mask
    return self.llm.embed(tokens)


def _examples(lengths, vocab: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"id": f"ex{i}", "num_dropped": 0,
           "tokens": rng.integers(0, vocab, size=n).astype(np.int32),
           "loss_mask": np.ones(n, bool), "vision_index": np.full(n, -1, np.int32),
           "frames": np.zeros((0, 1, 1, 3), np.uint8)} for i, n in enumerate(lengths)]


def _batches(examples, *, batch: int, max_tokens: int, pack: bool, buckets,
             pack_window: int = 1) -> list[dict]:
  import grain

  from ma2mba_jax.data.batching import PadBatchIterDataset
  ds = PadBatchIterDataset(grain.MapDataset.source(examples).to_iter_dataset(),
                           batch_size=batch, max_tokens=max_tokens, max_frames=1,
                           image_size=1, tokens_per_frame=1, pad_id=0, pack=pack,
                           drop_remainder=False, bucket_lengths=buckets,
                           pack_window=pack_window)
  keys = ("tokens", "loss_mask", "segment_ids", "vision_index")
  return [{k: b[k] for k in keys} for b in ds]


def run(args) -> dict:
  from ma2mba_jax.data import synthetic
  from ma2mba_jax.data.batch import Batch
  from ma2mba_jax.data.batching import bucket_ladder
  from ma2mba_jax.models.mamba2 import Mamba2LM
  from ma2mba_jax.models.presets import mamba2_config
  from ma2mba_jax.remat.settings import RematPolicy, RematSettings
  from ma2mba_jax.train.step import loss_sums

  config = mamba2_config(args.model, ssd_impl=args.ssd_impl, compute_dtype=args.compute_dtype)
  model = _TextModel(Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  lengths = synthetic.scenewalk_lengths(np.random.default_rng(args.seed), args.examples,
                                        max_tokens=args.max_tokens)
  examples = _examples(lengths, config.vocab_size, args.seed)
  s = min(args.time_block, args.max_tokens)
  s -= s % config.chunk_len
  remat_cfg = RematSettings(policy=RematPolicy.MAGC, l=args.layers_per_cell or config.n_layers,
                            s=max(s, config.chunk_len))
  ladder = bucket_ladder(args.max_tokens, multiple=args.bucket_multiple,
                         ratio=args.bucket_ratio)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    raise SystemExit(f"--modes: unknown mode(s) {unknown}; known: {', '.join(MODES)}")

  def make_step(packed: bool):
    def loss(params, batch):
      m = nnx.merge(graphdef, params)
      rows = Batch.from_dict({**batch, "frames": None, "frame_mask": None})
      total, count = loss_sums(m, rows, remat_cfg,
                               loss_block_len=args.loss_block, packed=packed)
      return total / jnp.maximum(count, 1.0), count
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  steps = {False: make_step(False), True: make_step(True)}
  out = dict(device=str(jax.devices()[0]), model=args.model,
             compute_dtype=args.compute_dtype, max_tokens=args.max_tokens,
             examples=args.examples, batch=args.batch, mean_length=float(np.mean(lengths)),
             buckets=list(ladder), magc_l=remat_cfg.l, magc_s=remat_cfg.s,
             pack_window=args.pack_window,
             padded_batches=args.padded_batches, results={})
  for mode in modes:
    batches = _batches(examples, batch=args.batch, max_tokens=args.max_tokens,
                       pack=mode.startswith("packing"),
                       buckets=ladder if mode == "buckets" else None,
                       pack_window=args.pack_window if mode == "packing" else 1)
    step = steps[mode in PACKED_MODES]
    shapes = sorted({b["tokens"].shape for b in batches})
    t0 = time.perf_counter()
    for shape in shapes:  # compile (and run once) every shape before timing
      first = next(b for b in batches if b["tokens"].shape == shape)
      jax.block_until_ready(step(params, first))
    compile_s = time.perf_counter() - t0
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    padded = sum(int(b["segment_ids"].size) for b in batches)
    timed = batches
    if mode.startswith("padded") and args.padded_batches:
      timed = batches[:args.padded_batches]  # one shape: the same cost whatever the content
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for b in timed:
        result = step(params, b)
      jax.block_until_ready(result)
      best = min(best, time.perf_counter() - t0)
    total_s = best * len(batches) / len(timed)
    out["results"][mode] = dict(
        batches=len(batches), timed_batches=len(timed), shapes=len(shapes), real_tokens=real,
        padded_tokens=padded, padding_frac=1.0 - real / padded, compile_s=compile_s,
        time_s=total_s, real_tokens_per_s=real / total_s, padded_tokens_per_s=padded / total_s)
    if args.json:  # after every mode: a run cut short keeps what it measured
      with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
  return out


def format_table(out: dict) -> str:
  """The printed table: one line a mode, ratios against the padded mode when it ran."""
  lines = [f"{out['device']}, model {out['model']} ({out['compute_dtype']} compute), "
           f"{out['examples']} examples (mean "
           f"{out['mean_length']:.0f} tokens), batch {out['batch']}, max_tokens "
           f"{out['max_tokens']}, buckets {out['buckets']}, MA-GC l={out['magc_l']} "
           f"s={out['magc_s']}, pack_window {out.get('pack_window', 1)} (packing mode)"]
  lines.append(f"{'mode':<14} {'batches':>7} {'shapes':>6} {'real tok':>9} {'padded tok':>10} "
               f"{'padding':>7} {'compile s':>9} {'time s':>7} {'real tok/s':>11} "
               f"{'padded tok/s':>12} {'vs padded':>9} {'vs fixed':>8}")
  padded = out["results"].get("padded")
  for mode, r in out["results"].items():
    vs_padded = vs_fixed = "-"
    if padded:
      vs_padded = f"{r['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x"
      vs_fixed = f"{r['real_tokens_per_s'] / padded['padded_tokens_per_s']:.2f}x"
    lines.append(
        f"{mode:<14} {r['batches']:>7} {r['shapes']:>6} {r['real_tokens']:>9} "
        f"{r['padded_tokens']:>10} {100 * r['padding_frac']:>6.1f}% {r['compile_s']:>9.1f} "
        f"{r['time_s']:>7.2f} {r['real_tokens_per_s']:>11,.0f} "
        f"{r['padded_tokens_per_s']:>12,.0f} {vs_padded:>9} {vs_fixed:>8}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--ssd_impl", default="auto")
  parser.add_argument("--compute_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="matmul / SSD input dtype (the training configs' default: bf16)")
  parser.add_argument("--max_tokens", type=int, default=2048)
  parser.add_argument("--examples", type=int, default=48)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " +
                      ", ".join(MODES))
  parser.add_argument("--padded_batches", type=int, default=0,
                      help="time only this many batches of the padded modes (0: all)")
  parser.add_argument("--bucket_multiple", type=int, default=256)
  parser.add_argument("--bucket_ratio", type=float, default=2.0,
                      help="ratio between bucket lengths (under 2: less padding, more shapes)")
  parser.add_argument("--pack_window", type=int, default=16,
                      help="the packing mode's lookahead window (data.pack_window)")
  parser.add_argument("--time_block", type=int, default=512, help="MA-GC s")
  parser.add_argument("--layers_per_cell", type=int, default=0, help="MA-GC l (0: all)")
  parser.add_argument("--loss_block", type=int, default=1024)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  out = run(args)
  print(format_table(out))
  if args.json:
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
