"""Train one stage of Video-Ma²mba.

  python -m ma2mba_jax.main --config=configs/stage2.py:model=3.1b --workdir=runs/stage2

Resumes by itself from the newest checkpoint in --workdir. Multi-host: pass
--distributed to call jax.distributed.initialize() (SLURM/TPU environments fill its
arguments); see launch/.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ma2mba_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/stage2.py:model=3.1b.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  logging.set_verbosity(logging.INFO)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
