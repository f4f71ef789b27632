"""Optimizer: AdamW with a warmup-cosine schedule per parameter group, global-norm clipping.

Parameter groups follow the model's top-level attributes: `vision` (the encoder), `projector`
and `llm`. A group whose peak learning rate is 0 is frozen: the trainer takes no gradient for
it at all (see `trainable_filter`), so it costs neither memory nor time.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

GROUPS = ("vision", "projector", "llm")


def group_of(path: tuple) -> str:
  """The parameter group of a state path, e.g. ('llm', 'layers', ...) -> 'llm'."""
  head = str(getattr(path[0], "key", path[0]))
  if head not in GROUPS:
    raise ValueError(f"parameter {'/'.join(map(str, path))} belongs to no optimizer group "
                     f"{GROUPS}")
  return head


def peak_lrs(optim_cfg: Any) -> dict[str, float]:
  return {"vision": optim_cfg.lr_vision, "projector": optim_cfg.lr_projector,
          "llm": optim_cfg.lr_llm}


def trainable_groups(optim_cfg: Any) -> tuple[str, ...]:
  return tuple(g for g, lr in peak_lrs(optim_cfg).items() if lr > 0)


def schedule(peak_lr: float, total_steps: int, warmup_frac: float) -> optax.Schedule:
  warmup = max(1, int(round(total_steps * warmup_frac))) if warmup_frac > 0 else 0
  if warmup == 0:
    return optax.cosine_decay_schedule(peak_lr, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1))


def _decays(path, leaf) -> bool:
  """Weight decay on matrices only: not on norms, biases, A_log, D, dt_bias, embeddings' 1-D."""
  del path
  return getattr(leaf, "ndim", 0) >= 2


def make_optimizer(optim_cfg: Any, total_steps: int, params: Any) -> optax.GradientTransformation:
  """AdamW per trainable group over `params` (only the trainable ones), with clipping.

  params: the trainable parameter pytree (its paths begin with a group name).
  """
  groups = set(jax.tree_util.tree_leaves(labels_of(params)))
  lrs = peak_lrs(optim_cfg)
  transforms = {}
  for group in groups:
    if group == FROZEN:
      transforms[group] = optax.set_to_zero()
      continue
    transforms[group] = optax.adamw(
        schedule(lrs[group], total_steps, optim_cfg.warmup_frac), b1=optim_cfg.b1,
        b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
        mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p))
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip),
                     optax.multi_transform(transforms, labels_of))


# Parameters that no forward pass reads (the vision tower's layers after the feature layer,
# kept so that converted checkpoints round-trip): never updated, so weight decay cannot drift
# them.
UNUSED_MARKERS = ("unused_layers", "post_norm")
FROZEN = "frozen"


def labels_of(params: Any) -> Any:
  def label(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    return FROZEN if any(m in keys for m in UNUSED_MARKERS) else group_of(path)
  return jax.tree_util.tree_map_with_path(label, params)


def learning_rates(optim_cfg: Any, total_steps: int, step: int) -> dict[str, float]:
  """The scheduled learning rate of every trainable group at `step` (for logging)."""
  return {g: float(schedule(lr, total_steps, optim_cfg.warmup_frac)(step))
          for g, lr in peak_lrs(optim_cfg).items() if lr > 0}
