"""Stage 3 on the demo data with packing off and on, the same examples seen (issue 17).

    # steps of a packed run that sees at least the unpacked run's examples (N steps x rows)
    python -m ma2mba_jax.bench.packing_runs steps --data_dir DIR --examples 1200 --rows 3
    # the two runs: python -m ma2mba_jax.main --config=configs/stage3.py:demo ... twice
    python -m ma2mba_jax.bench.packing_runs compare --unpacked RUN1 --packed RUN2 [--json F]

`steps` reads the packed training batches the trainer would read (stage 3 demo config,
data.packing on, `--rows` rows a step) and prints how many steps it takes to place at least
`--examples` examples; the shuffled example order is the same with packing off and on, so a
run of that many steps sees the unpacked run's examples (and the few after them that fill
its last step); with data.pack_window > 1 (the default) up to that many of them may be
swapped for ones a little later in the order (the packer's lookahead window). `compare` reads each run's metrics.jsonl (the trainer logs `examples`,
`wall_s` and `eval_s` with every record) and prints, for each run: steps, examples seen,
the final validation loss, the wall time (eval excluded) at the end and at the first
evaluation whose loss is at most the unpacked run's final one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def packed_steps(config, examples: int) -> tuple[int, int]:
  """(steps, examples placed) of a packed run of `config` until it has placed at least
  `examples` training examples (one batch of config.optim.global_batch rows a step)."""
  from ma2mba_jax.data.pipeline import make_pipeline
  from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
  from ma2mba_jax.train import trainer
  tokenizer = load_tokenizer(trainer.tokenizer_path(config))
  model_cfg = trainer.build_model_config(config, vocab_size(tokenizer))
  settings = trainer.data_settings(config, model_cfg)
  settings["packing"] = True
  batches = iter(make_pipeline(settings, tokenizer=tokenizer))
  steps = 0
  while batches.stats["examples"] < examples:
    next(batches)
    steps += 1
  return steps, batches.stats["examples"]


def read_run(workdir: str) -> dict:
  """A run's training and eval records from workdir/metrics.jsonl, and its config."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "val_loss" in r]
  if not train or not evals:
    raise SystemExit(f"{workdir}/metrics.jsonl has no training or no validation records "
                     f"(set config.eval.batches > 0)")
  for r in train + evals:
    if "wall_s" not in r:
      raise SystemExit(f"{workdir}/metrics.jsonl: step {r['step']} has no wall_s (written "
                       f"by a trainer older than issue 17's metrics)")
  return dict(config=config, train=train, evals=evals)


def summary(run: dict, target_loss: float) -> dict:
  """What `compare` prints for a run: final figures and when it reached `target_loss`."""
  last_train, last_eval = run["train"][-1], run["evals"][-1]
  reached = next((r for r in run["evals"] if r["val_loss"] <= target_loss), None)
  if reached is not None:  # the training record of that step (before evaluating, saving)
    reached = next((r for r in run["train"] if r["step"] == reached["step"]), reached)
  first = run["train"][0]
  return dict(
      packing=bool(run["config"]["data"]["packing"]),
      rows_per_step=run["config"]["optim"]["global_batch"],
      steps=last_train["step"], examples=int(last_train["examples"]),
      val_loss=last_eval["val_loss"], val_tokens=last_eval["val_tokens"],
      val_examples_at=int(last_eval["examples"]),
      wall_s=last_train["wall_s"] - last_train["eval_s"],
      loop_s=(last_train["wall_s"] - last_train["eval_s"])
      - (first["wall_s"] - first["eval_s"]),
      first_logged_step=first["step"],
      reached_step=reached and reached["step"],
      reached_examples=reached and int(reached["examples"]),
      reached_wall_s=reached and reached["wall_s"] - reached["eval_s"],
      real_tokens_per_s=last_train.get("tokens_per_s"),
      padding_frac=last_train.get("padding_frac"))


def compare(unpacked_dir: str, packed_dir: str) -> dict:
  runs = {"unpacked": read_run(unpacked_dir), "packed": read_run(packed_dir)}
  target = runs["unpacked"]["evals"][-1]["val_loss"]
  return {"target_val_loss": target,
          **{name: summary(run, target) for name, run in runs.items()}}


def format_compare(out: dict) -> str:
  def num(value, fmt):
    return "-" if value is None else format(value, fmt)
  lines = [f"target: the unpacked run's final validation loss {out['target_val_loss']:.4f}",
           f"{'run':<9} {'rows':>4} {'steps':>5} {'examples':>8} {'val loss':>8} "
           f"{'wall s':>7} {'loop s':>7} {'padding':>7} {'reached at step':>15} "
           f"{'examples':>8} {'wall s':>7}"]
  for name in ("unpacked", "packed"):
    r = out[name]
    padding = "-" if r["padding_frac"] is None else f"{100 * r['padding_frac']:.0f}%"
    lines.append(
        f"{name:<9} {r['rows_per_step']:>4} {r['steps']:>5} {r['examples']:>8} "
        f"{r['val_loss']:>8.4f} {r['wall_s']:>7.1f} {r['loop_s']:>7.1f} {padding:>7} "
        f"{num(r['reached_step'], 'd'):>15} {num(r['reached_examples'], 'd'):>8} "
        f"{num(r['reached_wall_s'], '.1f'):>7}")
  lines.append("wall s: seconds from the stage's start (checks, compile, data) to its last "
               "step, validation excluded; loop s: from the first logged step to the last")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  steps = sub.add_parser("steps", help="steps of a packed stage-3 demo run for N examples")
  steps.add_argument("--data_dir", required=True, help="the demo data (demo.make_data)")
  steps.add_argument("--examples", type=int, required=True)
  steps.add_argument("--rows", type=int, required=True, help="config.optim.global_batch")
  cmp = sub.add_parser("compare", help="the two runs' figures from their metrics.jsonl")
  cmp.add_argument("--unpacked", required=True)
  cmp.add_argument("--packed", required=True)
  cmp.add_argument("--json", default="")
  args = parser.parse_args(argv)
  if args.command == "steps":
    from configs import stage3
    config = stage3.get_config("demo")
    config.data.synthetic_dir = args.data_dir
    config.optim.global_batch = args.rows
    n, seen = packed_steps(config, args.examples)
    print(n)
    print(f"{n} packed steps of {args.rows} rows place {seen} examples (asked {args.examples})",
          file=sys.stderr)
    return
  out = compare(args.unpacked, args.packed)
  print(format_compare(out))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
