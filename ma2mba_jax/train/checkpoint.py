"""Orbax checkpoints of a training run, resumed exactly.

workdir/checkpoints/<step>/ holds four items:
  params     the model parameters (float32 master weights), a pure-dict pytree
  opt_state  the optimizer state
  meta       JSON: step, the RNG key data, the stage, the config's repr
  data       the Grain iterator state, so a resumed run reads exactly the next batches
Saves are asynchronous (training continues while the files are written) and kept by a
preservation policy: the newest `max_to_keep`, plus every `keep_period`-th step.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("params", "opt_state", "meta", "data")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_saved_step(workdir: str) -> int | None:
  """The newest finished checkpoint's step, read without creating anything (Orbax writes a
  step to a temporary name and renames it to the step number when it is complete)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=None)


class Checkpointer:
  """The run's CheckpointManager with the items above."""

  def __init__(self, workdir: str, ckpt_cfg: Any):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep, keep_period=ckpt_cfg.keep_period,
        enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params: Any, opt_state: Any, rng: jax.Array, data_iter: Any,
           extra_meta: dict[str, Any] | None = None) -> None:
    meta = {"step": int(step), "rng": jax.device_get(jax.random.key_data(rng)).tolist(),
            **(extra_meta or {})}
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iter)),
        force=True)
    logging.info("checkpoint: saving step %d (asynchronously) to %s", step,
                 self.manager.directory)

  def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any,
              data_iter: Any) -> tuple[Any, Any, jax.Array, dict]:
    """Restores params and optimizer state (with the abstract trees' shardings), the RNG
    and the data iterator (in place)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(data_iter)))
    meta = restored["meta"]
    rng = jax.random.wrap_key_data(jax.numpy.asarray(meta["rng"], jax.numpy.uint32))
    return restored["params"], restored["opt_state"], rng, meta

  def delete(self, step: int) -> None:
    self.manager.wait_until_finished()
    self.manager.delete(step)
    logging.info("checkpoint: deleted step %d", step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params_from_run(workdir: str, abstract_params: Any) -> tuple[Any, int]:
  """The params of the newest checkpoint of another run (e.g. the previous stage)."""
  directory = checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from={workdir!r}: no checkpoint under {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  manager.close()
  return restored["params"], step
