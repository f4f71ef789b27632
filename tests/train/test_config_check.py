"""Config values out of range fail before anything runs, naming the field."""

import pytest

from configs import stage1, stage2, stage3
from ma2mba_jax.train import config_check, trainer


@pytest.mark.parametrize("module", [stage1, stage2, stage3])
@pytest.mark.parametrize("arg", [None, "demo", "model=0.7b,remat=layer"])
def test_shipped_configs_are_valid(module, arg):
  config_check.validate(module.get_config(arg))


@pytest.mark.parametrize("field,value,message", [
    ("remat.offload", "disk", "config.remat.offload='disk' is not one of none, sequence, all"),
    ("remat.policy", "fast", "config.remat.policy='fast' is not one of"),
    ("remat.cell_saves", "some", "config.remat.cell_saves='some' is not one of"),
    ("remat.l", "0", "config.remat.l='0' must be 'auto' or a positive integer"),
    ("remat.s", "4k", "config.remat.s='4k' must be 'auto' or a positive integer"),
    ("model.preset", "13b", "config.model.preset='13b' is not one of"),
    ("model.compute_dtype", "float16", "config.model.compute_dtype='float16'"),
    ("optim.warmup_frac", 1.5, r"config.optim.warmup_frac=1.5 must be in \[0, 1\)"),
    ("optim.lr_llm", -1.0, "config.optim.lr_llm=-1.0 must be >= 0"),
    ("train.steps", 0, "config.train.steps=0 must be >= 1"),
    ("ckpt.every_steps", 0, "config.ckpt.every_steps=0 must be an integer >= 1"),
    # 0 would delete every checkpoint as soon as it is saved.
    ("ckpt.max_to_keep", 0, "config.ckpt.max_to_keep=0 must be an integer >= 1"),
    ("eval.batches", -1, "config.eval.batches=-1 must be an integer >= 0"),
])
def test_trainer_rejects_overrides_naming_the_field(tmp_path, field, value, message):
  config = stage2.get_config("demo")
  section, name = field.split(".")
  config[section][name] = value   # as --config.<field>=<value> would, after get_config
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()   # nothing written
