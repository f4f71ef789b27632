"""The demo's stage configs are sane for its data: every stage trains the encoder (there is
no pretrained tiny one), and stage 1's short rows hold every image or clip with its caption."""

import pytest

from configs import stage1, stage2, stage3
from ma2mba_jax.data.example import ExampleSpec, build_example
from ma2mba_jax.data.pipeline import build_index
from ma2mba_jax.data.tokenizer import load_tokenizer, vocab_size
from ma2mba_jax.train import trainer


@pytest.mark.parametrize("module", [stage1, stage2, stage3])
def test_demo_trains_every_group(module):
  c = module.get_config("demo")
  assert c.model.preset == "tiny"
  assert min(c.optim.lr_llm, c.optim.lr_vision, c.optim.lr_projector) > 0
  assert c.optim.global_batch % c.optim.micro_batch == 0


def test_demo_stage1_rows_fit_images_and_clips_whole(demo_data):
  c = stage1.get_config("demo")
  c.data.synthetic_dir = demo_data
  tokenizer = load_tokenizer(trainer.tokenizer_path(c))
  model_cfg = trainer.build_model_config(c, vocab_size(tokenizer))
  settings = trainer.data_settings(c, model_cfg)
  spec = ExampleSpec(fps=settings["fps"], image_size=settings["image_size"],
                     tokens_per_frame=settings["tokens_per_frame"],
                     max_frames=settings["max_frames"], max_tokens=settings["max_tokens"])
  for sample in build_index(settings):
    example = build_example(sample, tokenizer=tokenizer, spec=spec)
    assert example["num_dropped"] == 0 and example["loss_mask"].any()
    # Every second of a clip (the tiny set's are 2-3 s; the demo's 3-5 s) is shown.
    assert len(example["frames"]) >= (1 if sample.media == "image" else 2)


def test_demo_refuses_data_written_by_another_generator(tmp_path):
  """A workdir from an older demo is named, not silently trained on."""
  import json

  from ma2mba_jax import demo
  data_dir = tmp_path / "demo" / "data"
  data_dir.mkdir(parents=True)
  (data_dir / "manifest.json").write_text(json.dumps({"frame_size": 32}))
  with pytest.raises(SystemExit, match="was written by another version of the demo"):
    demo.make_data(str(data_dir))
