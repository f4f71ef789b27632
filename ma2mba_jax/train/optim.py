"""Optimizer: AdamW with a warmup-cosine schedule per parameter group, global-norm clipping.

Parameter groups follow the model's top-level attributes: `vision` (the encoder), `projector`
and `llm`. A group whose peak learning rate is 0 is frozen: the trainer takes no gradient for
it at all (see `trainable_filter`), so it costs neither memory nor time.

Optimizer memory (AdamW keeps two moments per trained parameter: 8 bytes in float32, 24.2 GB
for the 3.1B model, as much as its weights and gradients together):
  optim.moments_dtype   float32 | bfloat16. bfloat16 stores both moments in bf16 (half the
                        bytes); the update itself is computed in float32 from them, and only
                        the stored moments are rounded (round to nearest).
  optim.state_memory    device | host | auto. host keeps the optimizer state in the host's
                        pinned memory (a `pinned_host` memory kind): the step brings it to the
                        device for the update, after the backward has freed the activations,
                        and writes it back (`with_state_memory`). auto: host when the
                        measuring MA-GC planner finds no plan with the state on the device
                        (train/trainer.py `resolved_memory`), else device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

GROUPS = ("vision", "projector", "llm")
# config.optim.moments_dtype and config.optim.state_memory.
MOMENTS_DTYPES = ("float32", "bfloat16")
STATE_MEMORIES = ("device", "host", "auto")
# bfloat16 keeps 8 significant bits: a moving average whose new-value weight (1 - beta) is
# below 2^-8 of the average moves by less than half a unit in the last place while the new
# values stay near it, so its stored value stops following them.
BF16_MIN_ONE_MINUS_BETA = 2.0**-8


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


def check_memory_options(optim_cfg: Any) -> None:
  """ValueError naming the field when config.optim.moments_dtype / state_memory is out of
  range (or bfloat16 moments with betas they cannot follow)."""
  dtype = optim_cfg.get("moments_dtype", "float32")
  memory = optim_cfg.get("state_memory", "device")
  if dtype not in MOMENTS_DTYPES:
    raise ValueError(f"config.optim.moments_dtype={dtype!r} is not one of "
                     f"{', '.join(MOMENTS_DTYPES)}")
  if memory not in STATE_MEMORIES:
    raise ValueError(f"config.optim.state_memory={memory!r} is not one of "
                     f"{', '.join(STATE_MEMORIES)}")
  if dtype == "bfloat16":
    for name in ("b1", "b2"):
      if 1 - optim_cfg[name] < BF16_MIN_ONE_MINUS_BETA:
        raise ValueError(
            f"config.optim.{name}={optim_cfg[name]} with moments_dtype='bfloat16': 1 - {name} "
            f"must be at least 2^-8 = {BF16_MIN_ONE_MINUS_BETA:.5f} (bfloat16's 8 significant "
            f"bits cannot hold a smaller step of the moving average); use "
            f"moments_dtype='float32' or state_memory='host' instead")


def scale_by_adam(b1: float, b2: float, eps: float,
                  moments_dtype: str = "float32") -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in `moments_dtype` (optax's mu_dtype covers
  only the first). Same state tree (ScaleByAdamState), so checkpoints keep their layout.
  The stored moments are widened to float32, optax's float32 update runs on them (the
  moving averages, bias corrections and the step), and the new moments are rounded to
  `moments_dtype` (round to nearest) when stored."""
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  dtype = jnp.dtype(moments_dtype)
  if dtype == jnp.float32:
    return inner
  cast = lambda tree, to: jax.tree.map(lambda a: a.astype(to), tree)

  def init(params):
    state = inner.init(params)
    return state._replace(mu=cast(state.mu, dtype), nu=cast(state.nu, dtype))

  def update(updates, state, params=None):
    wide = state._replace(mu=cast(state.mu, jnp.float32), nu=cast(state.nu, jnp.float32))
    updates, new = inner.update(updates, wide, params)
    return updates, new._replace(mu=cast(new.mu, dtype), nu=cast(new.nu, dtype))

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg: Any, total_steps: int, params: Any) -> optax.GradientTransformation:
  """AdamW per trainable group over `params` (only the trainable ones), with clipping.

  params: the trainable parameter pytree (its paths begin with a group name).
  The AdamW is optax.adamw's chain (scale_by_adam, add_decayed_weights,
  scale_by_learning_rate) with the moments in config.optim.moments_dtype.
  """
  check_memory_options(optim_cfg)
  moments_dtype = optim_cfg.get("moments_dtype", "float32")
  groups = set(jax.tree_util.tree_leaves(labels_of(params)))
  lrs = peak_lrs(optim_cfg)
  transforms = {}
  for group in groups:
    if group == FROZEN:
      transforms[group] = optax.set_to_zero()
      continue
    transforms[group] = optax.chain(
        scale_by_adam(optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, moments_dtype),
        optax.add_decayed_weights(optim_cfg.weight_decay,
                                  lambda p: jax.tree_util.tree_map_with_path(_decays, p)),
        optax.scale_by_learning_rate(schedule(lrs[group], total_steps,
                                              optim_cfg.warmup_frac)))
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


# --------------------------------------------------------------------------- state memory


def host_shardings(shardings: Any) -> Any:
  """The same shardings in the host's pinned memory (optim.state_memory='host')."""
  return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings)


# with_state_memory: an optimization barrier ties the state's copy to the device to the
# gradients (see there).
ORDER_AFTER_GRADIENTS = True


def with_state_memory(optimizer: optax.GradientTransformation, device_shardings: Any,
                      state_memory: str) -> optax.GradientTransformation:
  """`optimizer` whose state lives in `state_memory` ('device' or 'host') between steps.

  With 'host' (the state's arrays carry `host_shardings(device_shardings)`), the update
  moves the state to the device (`device_shardings`), updates it there and moves the new
  state back: inside the jitted step the moments occupy the device only from the update
  on, after the forward and backward are done. The transfers cross PCIe twice a step (2 x
  the state's bytes).
  """
  if state_memory == "device":
    return optimizer
  if state_memory != "host":
    raise ValueError(f"state_memory={state_memory!r} must be 'device' or 'host' here "
                     f"('auto' is resolved by the trainer)")
  on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), device_shardings)
  on_host = host_shardings(device_shardings)

  def update(updates, state, params=None):
    if ORDER_AFTER_GRADIENTS:
      # The copy waits for the gradients: without it XLA may start bringing the state over
      # at the beginning of the step, and hold it through the backward.
      updates, state = jax.lax.optimization_barrier((updates, state))
    state = jax.device_put(state, on_device)
    updates, state = optimizer.update(updates, state, params)
    return updates, jax.device_put(state, on_host)

  return optax.GradientTransformation(optimizer.init, update)
