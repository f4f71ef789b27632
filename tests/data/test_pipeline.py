"""The Grain pipeline: the batch contract, padding and packing layout (hand-written
examples), Orbax resume to the identical next batches, worker processes, sharding,
shuffling, and skip_bad accounting."""

import json
import logging
import os
import signal

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ma2mba_jax.data import batching, manifest, pipeline
from ma2mba_jax.data.batching import EMPTY, SKIPPED, PadBatchIterDataset
from ma2mba_jax.data.errors import DataError
from ma2mba_jax.data.pipeline import build_index, make_pipeline
from ma2mba_jax.data.tokenizer import load_tokenizer

KEYS = ("tokens", "loss_mask", "vision_index", "segment_ids", "frames", "frame_mask")
K = 2  # tokens per frame in these tests


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
  return load_tokenizer(os.path.join(tiny_dataset[0], "tokenizer.json"))


def _config(tiny_dataset, stage, **overrides):
  config = {"stage": stage, "sources": manifest.sources(tiny_dataset[0], stage),
            "image_size": 32, "tokens_per_frame": K, "max_frames": 24, "max_tokens": 256,
            "batch_size": 2, "seed": 0}
  config.update(overrides)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _rows(batches):
  """The non-empty rows of batches, each as bytes of its tokens (to compare as sets)."""
  return [b["tokens"][r][b["segment_ids"][r] > 0].tobytes()
          for b in batches for r in range(b["tokens"].shape[0]) if b["segment_ids"][r].any()]


@pytest.mark.parametrize("stage,packing", [(1, False), (2, False), (3, False), (3, True)])
def test_batch_contract(tiny_dataset, tokenizer, stage, packing):
  it = iter(make_pipeline(_config(tiny_dataset, stage, packing=packing), tokenizer=tokenizer,
                          shard_index=0, shard_count=1))
  frame_id = tokenizer.token_to_id("<|frame|>")
  for batch in _take(it, 2):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((2, 256), np.int32), "loss_mask": ((2, 256), bool),
        "vision_index": ((2, 256), np.int32), "segment_ids": ((2, 256), np.int32),
        "frames": ((2, 24, 32, 32, 3), np.uint8), "frame_mask": ((2, 24), bool)}
    for r in range(2):
      real = batch["segment_ids"][r] > 0
      vision = batch["vision_index"][r]
      n_frames = int(batch["frame_mask"][r].sum())
      assert n_frames > 0 and batch["frame_mask"][r][:n_frames].all()  # frames first
      # Every vision token of every real frame appears exactly once, on a <|frame|> id.
      assert sorted(vision[vision >= 0].tolist()) == list(range(n_frames * K))
      assert (batch["tokens"][r][vision >= 0] == frame_id).all()
      assert (batch["tokens"][r][real & (vision < 0)] != frame_id).all()
      assert batch["loss_mask"][r].any() and not batch["loss_mask"][r][~real].any()
      assert not batch["frames"][r][n_frames:].any()
      assert np.all(np.diff(np.flatnonzero(real)) == 1) and real[0]  # tokens, then padding
      assert batch["segment_ids"][r].max() == 1 or packing
  assert it.stats["skipped"] == 0 and it.stats["batches"] == 2


def _example(tokens, vision, loss, n_frames, value, id_="x"):
  return {"tokens": np.array(tokens, np.int32), "vision_index": np.array(vision, np.int32),
          "loss_mask": np.array(loss, bool), "id": id_, "num_dropped": 0,
          "frames": np.full((n_frames, 2, 2, 3), value, np.uint8)}


def _batcher(elements, **kw):
  args = dict(batch_size=1, max_tokens=10, max_frames=4, image_size=2, tokens_per_frame=1,
              pad_id=0, pack=True, drop_remainder=True)
  args.update(kw)
  return PadBatchIterDataset(grain.MapDataset.source(elements).to_iter_dataset(), **args)


HAND = [
    _example([10, 11, 4, 4, 12], [-1, -1, 0, 1, -1], [0, 0, 0, 0, 1], 2, 7),
    _example([13, 4, 14], [-1, 0, -1], [0, 0, 1], 1, 9),
    _example([15, 4, 4, 16], [-1, 0, 1, -1], [0, 0, 0, 1], 2, 5),
]


def test_packing_layout():
  it = iter(_batcher(HAND, pack_window=1))  # the greedy in-order packer
  first = next(it)
  # Examples 1 and 2 share the row; example 3 (8 + 4 tokens) starts the next batch.
  assert first["tokens"].tolist() == [[10, 11, 4, 4, 12, 13, 4, 14, 0, 0]]
  assert first["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]]
  assert first["vision_index"].tolist() == [[-1, -1, 0, 1, -1, -1, 2, -1, -1, -1]]
  assert first["loss_mask"].astype(int).tolist() == [[0, 0, 0, 0, 1, 0, 0, 1, 0, 0]]
  assert first["frame_mask"].tolist() == [[True, True, True, False]]
  assert first["frames"][0, :, 0, 0, 0].tolist() == [7, 7, 9, 0]
  second = next(it)  # the last batch is complete: one row
  assert second["tokens"].tolist() == [[15, 4, 4, 16, 0, 0, 0, 0, 0, 0]]
  assert second["vision_index"].tolist() == [[-1, 0, 1, -1, -1, -1, -1, -1, -1, -1]]
  with pytest.raises(StopIteration):
    next(it)


def test_padding_layout_and_markers(caplog):
  elements = [HAND[0], {SKIPPED: "bad.mp4: broken"}, HAND[1], HAND[2], {EMPTY: True}]
  it = iter(_batcher(elements, batch_size=2, pack=False, drop_remainder=False))
  with caplog.at_level(logging.WARNING):
    first, second = next(it), next(it)
  assert first["tokens"].tolist() == [[10, 11, 4, 4, 12, 0, 0, 0, 0, 0],
                                      [13, 4, 14, 0, 0, 0, 0, 0, 0, 0]]
  assert first["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                                           [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
  assert first["vision_index"][1].tolist() == [-1, 0, -1, -1, -1, -1, -1, -1, -1, -1]
  assert first["frame_mask"].tolist() == [[True, True, False, False], [True, False, False, False]]
  # An EMPTY filler becomes an all-padding row.
  assert second["tokens"][1].tolist() == [0] * 10 and not second["segment_ids"][1].any()
  assert it.stats["skipped"] == 1 and "skipped bad.mp4: broken" in caplog.text
  with pytest.raises(StopIteration):
    next(it)
  # With drop_remainder, a last batch of one row (of two) is dropped.
  assert len(list(_batcher(HAND, batch_size=2, pack=False))) == 1


@pytest.mark.parametrize("stage,packing", [(2, False), (3, True)])
def test_resume_through_orbax_gives_identical_batches(tiny_dataset, tokenizer, tmp_path,
                                                      stage, packing):
  config = _config(tiny_dataset, stage, packing=packing)
  ds = make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1)
  it = iter(ds)
  _take(it, 3)
  # With packing, the batcher holds examples read past the last batch (its lookahead
  # window): the saved state must put them back in the stream.
  assert bool(it._window) == packing
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 4)
  stats = dict(it.stats)

  fresh = iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1))
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(fresh, 4), expected)
  assert fresh.stats == stats


def test_worker_processes_give_the_same_batches_and_restore(tiny_dataset, tokenizer):
  inline = iter(make_pipeline(_config(tiny_dataset, 3), tokenizer=tokenizer,
                              shard_index=0, shard_count=1))
  expected = _take(inline, 4)
  config = _config(tiny_dataset, 3, num_workers=2)
  it = iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1))
  try:
    _assert_same(_take(it, 2), expected[:2])
    state = json.loads(json.dumps(it.get_state()))  # what the Orbax handler writes
    _assert_same(_take(it, 2), expected[2:])
    # Rewinding restarts the workers from the saved state (a fresh iterator restores the
    # same way; that costs another worker start-up, and the inline test covers it).
    it.set_state(state)
    _assert_same(_take(it, 2), expected[2:])
  finally:
    it.close()


def test_shards_split_the_data(tiny_dataset, tokenizer):
  sources = manifest.sources(tiny_dataset[0], 1)["train"]  # 9 samples
  config = _config(tiny_dataset, 1, sources={"train": sources, "eval": sources},
                   batch_size=2, num_epochs=1)
  def run(split, index, count, **kw):
    cfg = {**config, **kw}
    return list(make_pipeline(cfg, tokenizer=tokenizer, split=split,
                              shard_index=index, shard_count=count))
  whole = _rows(run("eval", 0, 1))
  assert len(whole) == 9
  shards = [run("eval", i, 2) for i in range(2)]
  assert [len(s) for s in shards] == [3, 3]  # the same number of batches on every process
  assert sorted(_rows(shards[0]) + _rows(shards[1])) == sorted(whole)
  train = [_rows(run("train", i, 2, batch_size=1)) for i in range(2)]
  assert [len(t) for t in train] == [5, 4]
  assert sorted(train[0] + train[1]) == sorted(whole)


def test_shuffle_is_seeded(tiny_dataset, tokenizer):
  def epoch(seed):
    config = _config(tiny_dataset, 1, batch_size=1, num_epochs=1)
    return _rows(make_pipeline(config, tokenizer=tokenizer, seed=seed, shard_index=0,
                               shard_count=1))
  assert epoch(3) == epoch(3)
  assert epoch(3) != epoch(4) and sorted(epoch(3)) == sorted(epoch(4))


@pytest.fixture
def bad_source(tiny_dataset, tmp_path):
  """The tiny stage-3 QA annotations plus a record with a missing and one with a corrupt video."""
  folder = os.path.join(tiny_dataset[0], "stage3")
  with open(os.path.join(folder, "llava_video_qa.json")) as f:
    records = json.load(f)
  (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 3000)
  conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
  records += [{"id": "gone", "video": str(tmp_path / "gone.mp4"), "conversations": conv},
              {"id": "broken", "video": str(tmp_path / "corrupt.mp4"), "conversations": conv}]
  path = tmp_path / "qa_with_bad.json"
  path.write_text(json.dumps(records))
  return {"train": [{"format": "llava", "annotations": str(path), "media_root": folder}]}


def test_bad_videos_raise_or_are_skipped_and_counted(tiny_dataset, tokenizer, bad_source,
                                                      caplog):
  """When a sample is decoded (validate_media off: the files are not checked up front)."""
  config = _config(tiny_dataset, 3, sources=bad_source, batch_size=1, num_epochs=1,
                   validate_media=False)
  with pytest.raises(DataError, match="gone.mp4: video file not found|corrupt.mp4: cannot open"):
    list(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1))
  it = iter(make_pipeline({**config, "skip_bad": True}, tokenizer=tokenizer,
                          shard_index=0, shard_count=1))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  assert len(batches) == 4 and it.stats["skipped"] == 2
  assert "record 12 (id gone)" in caplog.text and "record 13 (id broken)" in caplog.text
  assert "2 samples skipped so far" in caplog.text


def test_validate_media_names_every_bad_file_before_decoding(tiny_dataset, bad_source,
                                                             tmp_path, caplog):
  """validate_media (the default): build_index names every missing or unreadable file, with
  the record that uses it, in one error; with skip_bad their samples are dropped."""
  config = _config(tiny_dataset, 3, sources=bad_source)
  with pytest.raises(DataError) as error:
    build_index(config)
  message = str(error.value)
  assert "2 of 6 media files are missing or unreadable (2 of 14 records use them)" in message
  assert "gone.mp4: video file not found [" in message and "record 12 (id gone)]" in message
  assert "corrupt.mp4: cannot open video" in message and "record 13 (id broken)]" in message
  with caplog.at_level(logging.WARNING):
    samples = build_index({**config, "skip_bad": True})
  assert len(samples) == 4 and all("qa_" in s.path for s in samples)
  assert "skip_bad: data 'train': 2 of 6 media files" in caplog.text
  # Stage-1 images are decoded (an image has no header to tell a corrupt one apart); a
  # video used by several records is named once, with the count of the others.
  folder = os.path.join(tiny_dataset[0], "stage1")
  (tmp_path / "zeros.png").write_bytes(b"\x00" * 500)
  conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
  records = [{"id": "good", "image": "images/img_00000.png", "conversations": conv},
             {"id": "zeros", "image": str(tmp_path / "zeros.png"), "conversations": conv},
             {"id": "lost", "image": str(tmp_path / "lost.png"), "conversations": conv},
             {"id": "v1", "video": str(tmp_path / "gone.mp4"), "conversations": conv},
             {"id": "v2", "video": str(tmp_path / "gone.mp4"), "conversations": conv}]
  (tmp_path / "images.json").write_text(json.dumps(records))
  sources = {"train": [{"format": "llava", "annotations": str(tmp_path / "images.json"),
                        "media_root": folder}]}
  with pytest.raises(DataError) as error:
    build_index(_config(tiny_dataset, 1, sources=sources))
  lines = str(error.value).splitlines()
  assert "3 of 4 media files are missing or unreadable (4 of 5 records use them)" in lines[0]
  for line, name, reason in zip(lines[1:], ("zeros.png", "lost.png", "gone.mp4"),
                                ("cannot decode image", "image file not found",
                                 "video file not found")):
    assert f"{name}: {reason}" in line, line
  assert len(lines) == 5 and "data.skip_bad=True" in lines[4]
  assert "record 3 (id v1) and 1 more record(s)]" in lines[3]
  # Nothing left after dropping: an error, not an empty run.
  (tmp_path / "bad_only.json").write_text(json.dumps(records[1:]))
  bad_only = {"train": [{**sources["train"][0], "annotations": str(tmp_path / "bad_only.json")}]}
  with pytest.raises(DataError, match="3 of 3 media files.*so none is left"):
    build_index(_config(tiny_dataset, 1, skip_bad=True, sources=bad_only))


def test_validate_media_opens_each_file_once(tiny_dataset, monkeypatch):
  """12 stage-3 records about 4 videos: 4 checks; an unchanged file is not checked again
  (the eval split is indexed at every evaluation)."""
  probed = []
  real_probe = pipeline.probe_media
  monkeypatch.setattr(pipeline, "probe_media", lambda *a: probed.append(a) or real_probe(*a))
  monkeypatch.setattr(pipeline, "_GOOD_MEDIA", set())
  assert len(build_index(_config(tiny_dataset, 3))) == 4
  assert sorted(os.path.basename(p) for p, _ in probed) == [f"qa_{i:05d}.mp4" for i in range(4)]
  assert {media for _, media in probed} == {"video"}
  build_index(_config(tiny_dataset, 3))
  assert len(probed) == 4
  monkeypatch.setattr(pipeline, "_GOOD_MEDIA", set())
  assert len(build_index(_config(tiny_dataset, 3, validate_media=False))) == 4
  assert len(probed) == 4  # validate_media off: nothing opened


def test_empty_annotation_list_warns_and_all_empty_is_an_error(tiny_dataset, tmp_path,
                                                               caplog):
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  real = manifest.sources(tiny_dataset[0], 2)["train"]
  sources = {"train": [*real, {"format": "scenewalk", "annotations": str(empty)}]}
  with caplog.at_level(logging.INFO):
    assert len(build_index(_config(tiny_dataset, 2, sources=sources))) == 2
  warned = [r for r in caplog.records if "holds no records" in r.getMessage()]
  assert len(warned) == 1 and warned[0].levelno == logging.WARNING
  assert str(empty) in warned[0].getMessage()
  other = tmp_path / "empty2.jsonl"
  other.write_text("\n")
  with pytest.raises(DataError, match=f"every annotation file is empty: {empty}, {other}"):
    build_index(_config(tiny_dataset, 2, sources={"train": [
        {"format": "scenewalk", "annotations": str(empty)},
        {"format": "scenewalk", "annotations": str(other)}]}))


@pytest.fixture
def fail_after_seconds():
  """Turns a hang into a test failure: SIGALRM raises TimeoutError after `seconds`."""
  def handler(signum, frame):
    raise TimeoutError("still running: skip_bad loops instead of giving up")
  previous = signal.signal(signal.SIGALRM, handler)
  yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
  signal.setitimer(signal.ITIMER_REAL, 0)
  signal.signal(signal.SIGALRM, previous)


def test_skip_bad_gives_up_when_no_sample_decodes(tiny_dataset, tokenizer, tmp_path,
                                                  fail_after_seconds):
  """Every video corrupt (and not checked up front): the endless train stream stops with
  the counts and the first bad files instead of skipping forever."""
  conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
  records = []
  for i in range(3):
    (tmp_path / f"bad{i}.mp4").write_bytes(bytes([i]) * 2000)
    records.append({"id": f"bad{i}", "video": f"bad{i}.mp4", "conversations": conv})
  (tmp_path / "qa.json").write_text(json.dumps(records))
  sources = {"train": [{"format": "llava", "annotations": str(tmp_path / "qa.json")}]}
  config = _config(tiny_dataset, 3, sources=sources, skip_bad=True, validate_media=False)
  fail_after_seconds(60)
  with pytest.raises(DataError) as error:
    next(iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1)))
  message = str(error.value)
  assert ("skip_bad: 6 samples in a row could not be decoded (twice this process's share "
          "(3) of the 3 samples of split 'train')") in message
  assert "(6 skipped, 0 decoded in all)" in message
  assert all(f"bad{i}.mp4: cannot open video" in message for i in range(3))
  # One epoch only: it gives up after the 3 samples there are.
  with pytest.raises(DataError, match="3 samples in a row .*all 3 samples this process"):
    next(iter(make_pipeline({**config, "num_epochs": 1}, tokenizer=tokenizer,
                            shard_index=0, shard_count=1)))


def test_give_up_counts_skips_in_a_row_only():
  bad = {SKIPPED: "bad.mp4: broken"}
  # Two skips, an example, two skips: never three in a row.
  it = iter(_batcher([bad, bad, HAND[0], bad, bad, HAND[1]], give_up_after=3, pack=False))
  assert len([next(it), next(it)]) == 2 and it.stats["skipped"] == 4
  assert it.stats["skipped_in_a_row"] == 0
  it = iter(_batcher([HAND[0], bad, bad, bad, HAND[1]], give_up_after=3, pack=False))
  next(it)
  with pytest.raises(DataError, match="3 samples in a row .*3 skipped, 1 decoded"):
    next(it)


def test_truncation_is_counted(tiny_dataset, tokenizer, caplog):
  config = _config(tiny_dataset, 2, max_frames=3, batch_size=1, num_epochs=1)
  it = iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  assert len(batches) == 2 and it.stats["truncated"] == 2
  assert all(b["frame_mask"].sum() <= 3 for b in batches)
  assert "trailing exchange(s) to fit" in caplog.text


def test_stage3_packs_a_video_across_annotation_files(tiny_dataset, tmp_path):
  folder = os.path.join(tiny_dataset[0], "stage3")
  with open(os.path.join(folder, "llava_video_qa.json")) as f:
    records = json.load(f)
  files = []
  for kind in ("open", "mc", "detail"):  # one file per kind, as LLaVA-Video ships them
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps([r for r in records if r["id"].endswith("_" + kind)]))
    files.append({"format": "llava", "annotations": str(path), "media_root": folder})
  samples = build_index(_config(tiny_dataset, 3, sources={"train": files}))
  assert len(samples) == 4  # videos
  assert all(len(s.exchanges) == 2 + 2 + 1 for s in samples)
  assert [s.id for s in samples] == [f"qa_{i:05d}_open+2#0" for i in range(4)]


def test_log_lines_thin_out_but_counts_stay_exact():
  assert [c for c in range(1, 70) if batching._worth_logging(c)] == [*range(1, 11), 16, 32, 64]


def test_config_dict_works_like_a_dict(tiny_dataset, tokenizer):
  config = _config(tiny_dataset, 2)
  frozen = ml_collections.ConfigDict(config)
  frozen.lock()
  a = next(iter(make_pipeline(config, tokenizer=tokenizer, shard_index=0, shard_count=1)))
  b = next(iter(make_pipeline(frozen, tokenizer=tokenizer, shard_index=0, shard_count=1)))
  _assert_same([a], [b])


@pytest.mark.parametrize("change,message", [
    ({"stage": 4}, "data.stage must be 1, 2 or 3"),
    ({"max_tokens": 0}, "data.max_tokens must be a positive integer"),
    ({"sources": {"val": []}}, "data.sources has no split 'train'"),
])
def test_config_errors(tiny_dataset, tokenizer, change, message):
  with pytest.raises(ValueError, match=message):
    make_pipeline({**_config(tiny_dataset, 1), **change}, tokenizer=tokenizer,
                  shard_index=0, shard_count=1)
