"""The real trainer with data.packing=True (issue 17): stage 3 of the demo, several examples
a row, trained a few steps under MA-GC; its validation loss is the direct float64 loss of
the exported model run with state resets at the segment starts, the loss never crossing a
boundary. (On this data the tiny model's state has decayed by the next segment's targets:
without resets the loss moves by only ~1e-6, so the test also checks that the train and
eval steps were traced with resets; tests/models/test_packing.py checks what they do.)"""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from configs import stage3
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.data.pipeline import make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.kernels.ssd import reset_from_segment_ids
from ma2mba_jax.train import bucket_steps
from ma2mba_jax.train import step as step_lib
from ma2mba_jax.train import trainer
from tests.train.test_trainer import first_batches, logged, tiny_config


def _packed_val_loss(model, batches):
  """Token cross-entropy in float64: position t predicts t+1 where t+1 is a target in the
  same segment; the model restarts at segment starts."""
  total, count = 0.0, 0.0
  for b in batches:
    seg = b["segment_ids"]
    reset = reset_from_segment_ids(jnp.asarray(seg))
    logits = np.asarray(model(b["tokens"], b["vision_index"], b["frames"], b["frame_mask"],
                              reset=reset), np.float64)              # [B, T, V]
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target = b["tokens"][:, 1:]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    weight = (b["loss_mask"][:, 1:] & same).astype(np.float64)
    picked = np.take_along_axis(log_p[:, :-1], target[..., None], axis=-1)[..., 0]
    total += float(-(picked * weight).sum())
    count += float(weight.sum())
  return total / count, count


def test_trainer_with_packing(demo_data, tmp_path, monkeypatch):
  traced = []

  def spy(segment_ids):
    traced.append(segment_ids.shape)
    return reset_from_segment_ids(segment_ids)
  monkeypatch.setattr(step_lib, "reset_from_segment_ids", spy)
  workdir = str(tmp_path / "packed")
  c = tiny_config(demo_data, module=stage3, steps=3, remat="magc")
  c.data.packing = True
  c.data.qa_per_sample = 1          # short examples: 2-3 a row
  c.data.max_tokens = 256
  c.data.max_frames = 12
  c.eval.batches = 8                # the whole val split: 2 of its 8 rows hold 2 examples
  c.eval.every_steps = 3
  last = trainer.train_and_evaluate(c, workdir)
  # The train step (one micro-batch row) and the eval step derived resets.
  assert len(traced) >= 2 and all(shape == (1, 256) for shape in traced), traced
  losses = logged(workdir)
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
  # Every record carries the examples seen (several a packed row), the wall time since the
  # stage started and the part of it spent in validation (issue 17's comparison reads them).
  train_batches = first_batches(c, 3)
  per_step = [int(b["segment_ids"].max(axis=1).sum()) for b in train_batches]
  assert max(per_step) > c.optim.global_batch  # packed: more examples than rows
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if "loss" in r]
  (eval_record,) = [r for r in records if "val_loss" in r]
  assert [r["examples"] for r in train_records] == [per_step[0], sum(per_step[:2]),
                                                    sum(per_step)]
  wall = [r["wall_s"] for r in train_records]
  assert 0 < wall[0] < wall[1] < wall[2], wall
  assert all(r["eval_s"] == 0.0 for r in train_records)
  assert eval_record["step"] == 3 and eval_record["examples"] == sum(per_step)
  assert 0 < eval_record["eval_s"] <= eval_record["wall_s"] - wall[2]

  tokenizer = load_tokenizer(trainer.tokenizer_path(c))
  settings = trainer.data_settings(c, trainer.build_model_config(c, vocab_size(tokenizer)))
  assert settings["packing"] is True
  settings["batch_size"] = c.optim.micro_batch
  val = make_pipeline(settings, tokenizer=tokenizer, split="val")
  batches = [b for _, b in zip(range(c.eval.batches), val)]
  assert sum(b["segment_ids"].max() >= 2 for b in batches) >= 2  # packed rows
  model = model_io.restore_model(os.path.join(workdir, trainer.MODEL_EXPORT))
  loss, count = _packed_val_loss(model, batches)
  assert last["val_tokens"] == count
  np.testing.assert_allclose(last["val_loss"], loss, rtol=1e-5)


def test_trainer_with_length_buckets(demo_data, tmp_path, caplog, monkeypatch):
  """Without packing, batches are cut to buckets: the train step sees (and compiles for) at
  most one shape per bucket, MA-GC's l and s ('auto') are planned for each bucket length
  (train/bucket_steps.py), and the metrics give real and padded tokens/s and the fraction
  of padding."""
  made = []

  def spy(*args, **kwargs):
    made.append(bucket_steps.StepPerLength(*args, **kwargs))
    return made[-1]
  monkeypatch.setattr(trainer, "StepPerLength", spy)
  c = tiny_config(demo_data, steps=4, remat="magc")   # l, s 'auto'
  # The paper's memory model plans l and s here: it gives the two lengths different plans.
  # (The measuring planner, with fused blocks and no device budget, puts one layer group
  # first at every length since f590bb1, so both lengths would get l=2 x s=16.)
  c.remat.planner = "model"
  c.data.max_tokens = 128
  c.data.bucket_lengths = (32,)  # the demo's rows are 29-39 tokens: both lengths come
  batches = first_batches(c, 4)
  lengths = sorted({b["tokens"].shape[1] for b in batches})
  assert lengths == [32, 128], lengths
  caplog.set_level(logging.INFO)
  trainer.train_and_evaluate(c, str(tmp_path / "buckets"))
  compiles = [r.getMessage() for r in caplog.records if "compile(s) so far" in r.getMessage()]
  assert len(compiles) == len(lengths), compiles
  (steps,) = made
  # Each length has its own plan, from the memory model at that length (tiny model: 2
  # layers, chunk 16; one layer a cell at 32 tokens, both at 128).
  plans = {n: (r.l, r.s) for n, r in steps.plans.items()}
  assert plans == {32: (1, 16), 128: (2, 16)}, plans
  built = [r.getMessage() for r in caplog.records if "bucket step(s) so far" in r.getMessage()]
  assert len(built) == 2 and "T=32: l=1 x s=16" in built[0] + built[1], built
  # One compile per length: each built step's jit cache holds one executable.
  assert [steps.step_for(n)._cache_size() for n in lengths] == [1, 1]
  padding = logged(str(tmp_path / "buckets"), "padding_frac")
  real = logged(str(tmp_path / "buckets"), "tokens_per_s")
  padded = logged(str(tmp_path / "buckets"), "padded_tokens_per_s")
  assert padding and all(0.0 <= v < 1.0 for v in padding.values())
  assert all(padded[s] >= real[s] for s in real)


def _segments(batches):
  """Each example's tokens, in the order the batches hold them (row by row)."""
  out = []
  for b in batches:
    for tokens, seg in zip(b["tokens"], b["segment_ids"]):
      out += [tokens[seg == s] for s in range(1, int(seg.max()) + 1)]
  return out


def test_packed_steps_see_the_unpacked_runs_examples(demo_data):
  """bench.packing_runs.steps: a packed run of that many steps places the unpacked run's
  examples, in the same order, and at most one step's worth more."""
  from ma2mba_jax.bench import packing_runs
  c = tiny_config(demo_data, module=stage3)
  c.data.qa_per_sample = 1
  c.data.max_tokens = 256
  c.data.max_frames = 12
  wanted = 3 * c.optim.global_batch                     # 3 unpacked steps
  unpacked = _segments(first_batches(c, 3))
  c.data.packing = True
  c.data.pack_window = 1  # in order (a wider window moves an example up to that many places)
  steps, seen = packing_runs.packed_steps(c, wanted)
  packed_batches = first_batches(c, steps)
  packed = _segments(packed_batches)
  assert steps < 3 and len(packed) == seen >= wanted    # 2-3 examples a packed row
  assert len(_segments(packed_batches[:-1])) < wanted   # one step fewer would not do
  for a, b in zip(unpacked, packed):
    np.testing.assert_array_equal(a, b)


def _write_run(path, packing, rows, records):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"data": {"packing": packing}, "optim": {"global_batch": rows}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def test_compare_reads_losses_examples_and_wall_time_without_eval(tmp_path):
  from ma2mba_jax.bench import packing_runs

  def train(step, examples, wall, eval_s):
    return {"step": step, "loss": 1.0, "examples": examples, "wall_s": wall, "eval_s": eval_s,
            "tokens_per_s": 10.0, "padding_frac": 0.5}

  def val(step, loss, examples, wall, eval_s):
    return {"step": step, "val_loss": loss, "val_tokens": 40.0, "examples": examples,
            "wall_s": wall, "eval_s": eval_s}
  _write_run(tmp_path / "u", False, 8, [
      train(10, 80, 20.0, 0.0), val(10, 3.0, 80, 22.0, 2.0), train(20, 160, 30.0, 2.0),
      val(20, 2.5, 160, 33.0, 3.0)])                        # a save before it
  _write_run(tmp_path / "p", True, 3, [
      train(9, 81, 15.0, 0.0), val(9, 2.4, 81, 16.0, 1.0), train(18, 162, 21.0, 1.0),
      val(18, 2.45, 162, 22.0, 2.0)])
  out = packing_runs.compare(str(tmp_path / "u"), str(tmp_path / "p"))
  assert out["target_val_loss"] == 2.5
  u, p = out["unpacked"], out["packed"]
  assert (u["steps"], u["examples"], u["val_loss"], u["packing"]) == (20, 160, 2.5, False)
  assert u["wall_s"] == 28.0 and u["loop_s"] == 8.0          # eval time left out
  assert u["reached_step"] == 20 and u["reached_wall_s"] == 28.0
  assert (p["steps"], p["examples"], p["rows_per_step"]) == (18, 162, 3)
  assert p["wall_s"] == 20.0 and p["loop_s"] == 5.0
  assert (p["reached_step"], p["reached_examples"], p["reached_wall_s"]) == (9, 81, 15.0)
  assert "2.5000" in packing_runs.format_compare(out)
