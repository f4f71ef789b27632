"""Train one stage of Video-Ma²mba.

  python -m ma2mba_jax.main --config=configs/stage2.py:model=3.1b --workdir=runs/stage2

--workdir defaults to runs/stage<N>. Resumes by itself from the newest checkpoint in the
workdir; a rerun with other settings stops, naming them (train/workdir.py). Multi-host: pass
--distributed to call jax.distributed.initialize() (SLURM/TPU environments fill its
arguments); see launch/.

A user error (a bad config value or field, a missing file, bad data, a NaN loss) ends in one
line naming it and exit status 1; --verbosity=1 shows its traceback.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/stage2.py:model=3.1b.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where checkpoints and metrics go (default runs/stage<N>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config"])

PROG = "python -m ma2mba_jax.main"


def _wants_traceback(argv: list[str]) -> bool:
  """--verbosity=N / -v N with N >= 1 (read before the flags are parsed)."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
    if match:
      value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "0")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def _config_fields(section: str) -> list[str]:
  """The fields of config.<section> in the shared config (for an unknown-field message)."""
  from configs import common
  config = common.get_base_config(1, None)
  return sorted(config[section].keys()) if section in config else sorted(config.keys())


def _unknown_field(name: str, argv: list[str]) -> str | None:
  """The message for --config.<section>.<name>=... when <name> is no field of the config."""
  for arg in argv:
    match = re.match(r"--(config\.[\w.]+)", arg)
    if match and match.group(1).split(".")[-1] == name:
      path = match.group(1).split(".")[1:]
      section = path[0] if len(path) > 1 else ""
      where = "config." + ".".join(path[:-1]) if section else "config"
      return (f"--{match.group(1)}: {where} has no field {name!r} (its fields: "
              f"{', '.join(_config_fields(section))})")
  return None


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a command-line error: the flag, the field or the file."""
  text = str(error)
  name = re.fullmatch(r"""["']*(\w+)["']*""", text.strip()) or re.search(
      r"Unknown command line flag 'config\.[\w.]*?(\w+)'", text)
  if name and _unknown_field(name.group(1), argv):
    return _unknown_field(name.group(1), argv)
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is not None:
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
      return (f"--config={config_arg}: no such file {path!r} (the stage configs are "
              f"configs/stage1.py, configs/stage2.py and configs/stage3.py)")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  cause = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else repr(error)
  head = lines[0] if lines else ""
  if head.startswith("flag --") and head != lines[-1]:  # the config file's own error
    return f"{head[len('flag '):].split(': ', 1)[0]}: {cause}"
  return cause.removeprefix("flag ")


def _add_config_root(argv: list[str]) -> None:
  """Lets a stage config's `from configs import common` work from any directory.

  configs/stageN.py imports its sibling configs/common.py as the package `configs`, which
  Python finds only when the directory holding configs/ is on sys.path (the repository root,
  when the command runs from there). A --config path given from elsewhere
  (/path/to/repo/configs/stage2.py) puts its root there.
  """
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return
  config_dir = os.path.dirname(os.path.abspath(config_arg.split(":", 1)[0]))
  if os.path.isfile(os.path.join(config_dir, "common.py")):
    root = os.path.dirname(config_dir)
    if root not in sys.path:
      sys.path.insert(0, root)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, and the config file loaded; an error ends in one line (exit status 2)."""
  _add_config_root(argv)
  try:
    rest = flags.FLAGS(argv)
    _ = _CONFIG.value.keys()  # a config file that failed to load raises here
    return rest
  except Exception as e:  # every error here is about the command line
    if _wants_traceback(argv):
      raise
    sys.stderr.write(f"{PROG}: error: {_flag_error(e, argv)}\n")
    sys.exit(2)


def default_workdir(config) -> str:
  return os.path.join("runs", f"stage{config.stage}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ma2mba_jax import errors
  from ma2mba_jax.train import metrics, trainer
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  metrics.quiet_library_logs()
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(config)
  print(f"[stage {config.stage}] workdir: {workdir}", flush=True)
  try:
    if _DISTRIBUTED.value:
      import jax
      jax.distributed.initialize()
    trainer.train_and_evaluate(config, workdir)
  except errors.USER_ERRORS as e:
    if flags.FLAGS.verbosity >= 1:
      raise
    sys.stderr.write(f"{PROG}: error: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
