"""The built-in demo, end to end on CPU: `scripts/demo.sh` (or `python -m ma2mba_jax.demo`).

  1. writes a synthetic long-video dataset (real mp4s, truthful captions, QA, an eval set
     in the Video-MME layout) with `ma2mba_jax.data.synthetic`;
  2. trains the tiny Video-Ma²mba through the paper's three stages, each starting from the
     previous stage's export (`python -m ma2mba_jax.main --config=configs/stageN.py:demo`);
  3. evaluates the result on the synthetic multiple-choice set, with chance and the p-value
     of guessing beside each score: by option likelihood, and by generation twice -- asked
     the Video-MME prompt for a letter, and asked the question alone, the answer's words
     matched to the options (see `evaluate`).

Everything goes under --workdir; running it again resumes where it stopped. A stage whose
settings or input changed since it was trained (e.g. `--steps=5,2,2` after `--steps=3,2,2`
trains stage 1 further, so stages 2 and 3 start from a new model) is trained again from the
start; its old workdir is kept as stageN.old.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging

from ma2mba_jax.data import synthetic

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")
_STEPS = flags.DEFINE_list("steps", ["400", "100", "600"], "Training steps of stages 1, 2, 3.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Evaluate only this many questions (0: all).")

# Enough data for the tiny model to learn colours, shapes and motions in a few CPU minutes
# without seeing an item many times. The stage-3 QA videos and the short eval videos are a
# single scene (2-5 s): the tiny model, trained in minutes, does not learn to tell its shapes
# apart well enough to find the scene a question names among several, and trained on such
# questions it learns answer priors instead of looking. The medium and long eval videos keep
# their key scene a needle among many (reported per duration).
DATA_COUNTS = dict(images=1000, clips=300, walks=60, qa_videos=800, qa_val_videos=24,
                   qa_scenes=(1, 1),
                   eval_videos=dict(short=18, medium=4, long=2),
                   eval_len=dict(short=(2, 2), medium=(30, 60), long=(120, 180)))
# Shapes bigger than the default (0.14 of the frame): at the tiny encoder's 32 x 32 pixels a
# default shape covers 6% of the frame, and the colour and kind of so few pixels take the
# demo's few hundred steps of a randomly initialised encoder longer than it has.
SHAPE_RADIUS = 0.22
FRAME_SIZE = 32


def make_data(data_dir: str) -> None:
  manifest_path = os.path.join(data_dir, "manifest.json")
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    written = {k: manifest.get(k) for k in ("generator_version", "frame_size", "shape_radius")}
    written["preset"] = {k: manifest.get("preset", {}).get(k) for k in DATA_COUNTS}
    wanted = {"generator_version": synthetic.GENERATOR_VERSION, "frame_size": FRAME_SIZE,
              "shape_radius": SHAPE_RADIUS, "preset": DATA_COUNTS}
    wanted = json.loads(json.dumps(wanted))  # tuples as the manifest's lists
    if written != wanted:
      workdir = os.path.dirname(os.path.abspath(data_dir))
      raise SystemExit(
          f"[demo] {data_dir} was written by another version of the demo ({written}, this "
          f"one writes {wanted}); its data and the stages trained on it would not match. "
          f"Remove {workdir} or pass another --workdir.")
    print(f"[demo] data: reusing {data_dir}", flush=True)
    return
  print(f"[demo] data: writing synthetic videos to {data_dir}", flush=True)
  synthetic.generate(data_dir, seed=0, size="small", frame_size=FRAME_SIZE,
                     shape_radius=SHAPE_RADIUS,
                     **DATA_COUNTS)


def restart_if_changed(config, stage_dir: str) -> bool:
  """Moves stage_dir aside (to stage_dir.old) when it was trained with other settings or
  from another input model than `config` names, so that the stage trains again from the
  start instead of resuming stale state; True if it did."""
  from ma2mba_jax.train import workdir as workdir_lib
  found = workdir_lib.changes(config, stage_dir)
  if not found:
    return False
  old = stage_dir.rstrip(os.sep) + ".old"
  shutil.rmtree(old, ignore_errors=True)
  os.replace(stage_dir, old)
  print(f"[demo] stage {config.stage}: {stage_dir} was trained with other settings or input "
        f"({'; '.join(found)}); training it again from the start (the old run: {old})",
        flush=True)
  return True


def train_stages(workdir: str, data_dir: str) -> str:
  from configs import stage1, stage2, stage3
  from ma2mba_jax.train import trainer
  previous = ""
  for stage, (module, steps) in enumerate(zip((stage1, stage2, stage3), _STEPS.value), 1):
    config = module.get_config("demo")
    config.data.synthetic_dir = data_dir
    config.train.steps = int(steps)
    config.init_from = previous
    stage_dir = os.path.join(workdir, f"stage{stage}")
    restart_if_changed(config, stage_dir)
    print(f"[demo] stage {stage}: training {steps} steps in {stage_dir}"
          + (f", starting from {previous}" if previous else ""), flush=True)
    trainer.train_and_evaluate(config, stage_dir)
    previous = stage_dir
  return previous


def evaluate(final_stage: str, data_dir: str) -> dict:
  """The synthetic multiple-choice set, by option likelihood and by generation.

  likelihood     each option's text scored as the answer to the bare question (target
                 'text', a cloze test: see infer/answering.py); `python -m
                 ma2mba_jax.evaluate --likelihood_target=letter` scores the option letters
                 after the multiple-choice prompt instead;
  generate       greedy answer to the multiple-choice prompt with the Video-MME
                 instruction, its option letter parsed (Video-MME's protocol);
  generate_text  greedy answer to the question alone, right only if its words name the
                 correct option's text and no other (the options are never shown).
  The demo's minutes teach the tiny model to say what it saw far better than to find that
  answer's letter among shuffled options: from a clean workdir (2026-11-26) generate_text
  scored 46.9% (59.7% on the short videos), generate 19.8%, chance 25%. The letter is what
  fails, not the parsing: trained to answer "diamond (C)" instead of "C", the same model
  named the right text as often but its letter stayed at chance (22.9%).
  """
  from ma2mba_jax import evaluate as evaluate_lib
  from ma2mba_jax.infer import answering, checkpoint
  items = evaluate_lib.load_items("synthetic", data_dir, limit=_EVAL_LIMIT.value or None)
  model, tokenizer = checkpoint.load(final_stage)
  answerer = answering.ModelAnswerer.create(model, tokenizer, frames_per_step=8,
                                            mc_max_new_tokens=8, target="text")
  print(f"[demo] evaluating {len(items)} multiple-choice questions on the synthetic set",
        flush=True)
  return evaluate_lib.evaluate_items(
      "synthetic", data_dir, items, answerer=answerer, methods=answering.MC_METHODS,
      json_path=os.path.join(final_stage, "eval_synthetic.json"))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  data_dir = os.path.join(workdir, "data")
  os.makedirs(workdir, exist_ok=True)
  make_data(data_dir)
  from ma2mba_jax.errors import USER_ERRORS
  try:
    final = train_stages(workdir, data_dir)
  except USER_ERRORS as e:  # the message names the field, file or step
    if flags.FLAGS.verbosity >= 1:
      raise
    sys.exit(f"[demo] error: {e}")
  print(f"[demo] trained model: {final}/model", flush=True)
  evaluate(final, data_dir)


if __name__ == "__main__":
  app.run(main)
