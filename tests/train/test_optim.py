"""Optimizer memory options (train/optim.py): bfloat16 Adam moments and optimizer state in
host memory, on their own and through the trainer (stop and resume exactly, the budget)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import stage1
from ma2mba_jax.remat import measure
from ma2mba_jax.train import checkpoint, config_check, optim, trainer
from ma2mba_jax.errors import ConfigError
from tests.train.test_trainer import logged, tiny_config


def optim_config(**changes):
  c = stage1.get_config("demo").optim
  for key, value in changes.items():
    c[key] = value
  return c


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return {"llm": {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                  "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}}


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_moments_are_the_float32_update_from_the_rounded_moments(seed):
  """The bf16 optimizer given moments M updates exactly as the float32 one given M widened,
  and stores that one's new moments rounded to bf16: only the storage is bf16."""
  params = random_tree(seed)
  low = optim.make_optimizer(optim_config(moments_dtype="bfloat16"), 10, params)
  full = optim.make_optimizer(optim_config(), 10, params)
  state_low, state_full = low.init(params), full.init(params)
  assert (jax.tree.structure(state_low) == jax.tree.structure(state_full))  # same layout
  adam_low = state_low[1].inner_states["llm"].inner_state[0]
  assert {a.dtype for a in jax.tree.leaves((adam_low.mu, adam_low.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert state_low[1].inner_states["llm"].inner_state[0].count.dtype == jnp.int32
  for step in range(3):
    grads = random_tree(100 + 10 * seed + step)
    widened = jax.tree.map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, state_low)
    upd_low, state_low = jax.jit(low.update)(grads, state_low, params)
    upd_full, new_full = jax.jit(full.update)(grads, widened, params)
    jax.tree.map(np.testing.assert_array_equal, upd_low, upd_full)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b.astype(a.dtype))), state_low, new_full)
    params = optax.apply_updates(params, upd_low)


def test_memory_options_are_checked():
  for field, value in (("moments_dtype", "float16"), ("state_memory", "disk")):
    c = stage1.get_config("demo")
    c.optim[field] = value
    with pytest.raises(ConfigError, match=f"config.optim.{field}={value!r}"):
      config_check.validate(c)
  c = stage1.get_config("demo")
  c.optim.moments_dtype = "bfloat16"
  c.optim.b2 = 0.999          # 1 - b2 = 0.001 < 2^-8: bf16 cannot follow the average
  with pytest.raises(ConfigError, match="config.optim.b2=0.999 with moments_dtype"):
    config_check.validate(c)
  with pytest.raises(ValueError, match="'auto' is resolved by the trainer"):
    optim.with_state_memory(optax.sgd(1.0), {}, "auto")


def test_state_in_host_memory_updates_as_on_the_device():
  params = random_tree(3)
  grads = random_tree(4)
  optimizer = optim.make_optimizer(optim_config(), 10, params)
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), optimizer.init(params))
  hosted = optim.with_state_memory(optimizer, shardings, "host")
  on_host = optim.host_shardings(shardings)
  state = jax.jit(hosted.init, out_shardings=on_host)(params)
  assert {a.sharding.memory_kind for a in jax.tree.leaves(state)} == {"pinned_host"}
  upd_host, new_host = jax.jit(hosted.update, out_shardings=(None, on_host))(
      grads, state, params)
  upd, new = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  assert {a.sharding.memory_kind for a in jax.tree.leaves(new_host)} == {"pinned_host"}
  jax.tree.map(np.testing.assert_array_equal, upd_host, upd)
  jax.tree.map(np.testing.assert_array_equal, new_host, new)


def memory_config(data_dir, steps=4, remat="magc"):
  c = tiny_config(data_dir, steps=steps, remat=remat)
  c.optim.moments_dtype = "bfloat16"
  c.optim.state_memory = "host"
  return c


def test_trainer_with_bf16_moments_in_host_memory_resumes_exactly(demo_data, tmp_path):
  # Runs that stop (at step 4 of 100) save a checkpoint and skip the export: cheaper.
  c = memory_config(demo_data, steps=100, remat="none")
  straight = str(tmp_path / "straight")
  c.train.stop_at_step = 4
  trainer.train_and_evaluate(c, straight)
  resumed = str(tmp_path / "resumed")
  c.train.stop_at_step = 2
  trainer.train_and_evaluate(c, resumed)
  c.train.stop_at_step = 4
  trainer.train_and_evaluate(c, resumed)          # restores bf16 moments into host memory
  assert logged(resumed) == logged(straight)      # every step's loss, bit for bit
  import orbax.checkpoint as ocp
  states = []
  for workdir in (straight, resumed):
    manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                    item_names=checkpoint.ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    states.append(manager.restore(4, args=ocp.args.Composite(
        opt_state=ocp.args.StandardRestore()))["opt_state"])
    manager.close()
  dtypes = {np.asarray(a).dtype for a in jax.tree.leaves(states[0])}
  assert jnp.dtype(jnp.bfloat16) in dtypes and np.dtype(np.float32) not in dtypes, dtypes
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               states[0], states[1])


def test_state_memory_auto_goes_to_host_only_when_the_device_cannot_hold_the_plan(
    demo_data, tmp_path, monkeypatch):
  """auto: device when a measured plan fits beside the optimizer state, host when it fits
  only without it; the host layout puts the state in pinned host memory and the budget
  leaves it out."""
  c = tiny_config(demo_data)
  c.remat.l, c.remat.s = "2", "32"             # one candidate: one compile
  c.remat.cell_saves, c.remat.offload = "nothing", "none"
  model_cfg = trainer.build_model_config(c, trainer.vocab_size(
      trainer.load_tokenizer(trainer.tokenizer_path(c))))
  mesh = trainer.sharding.make_mesh(c.mesh)
  fixed = trainer._training_state_bytes(c, model_cfg, mesh, "device")
  assert trainer._training_state_bytes(c, model_cfg, mesh, "host")["opt_state_bytes"] == 0
  assert fixed["opt_state_bytes"] > 0
  c.optim.moments_dtype = "bfloat16"          # the budget counts the moments' real bytes
  low = trainer._training_state_bytes(c, model_cfg, mesh, "device")["opt_state_bytes"]
  c.optim.moments_dtype = "float32"
  assert abs(low - fixed["opt_state_bytes"] / 2) < 1024   # (the step counts stay int32)
  (needed,) = measure.measure(model_cfg.llm_config, c.optim.micro_batch, c.data.max_tokens,
                              [measure.Candidate(2, 32)], cache=trainer.PLAN_CACHE)
  needed = needed.device_bytes
  margin = 1 - measure.DEFAULT_MARGIN_FRAC

  def resolve(device_bytes):
    monkeypatch.setattr(measure, "device_memory_bytes", lambda: device_bytes)
    return trainer.resolved_memory(c, model_cfg, mesh)[1]

  half_state = fixed["opt_state_bytes"] / 2
  base = fixed["weight_bytes"] + fixed["grad_bytes"] + needed
  assert resolve((base + 3 * half_state) / margin) == "device"
  assert resolve((base + half_state) / margin) == "host"
  with pytest.raises(measure.NoPlanFitsError):
    resolve((base - half_state) / margin)
  c.optim.state_memory = "device"                 # never host unless asked or auto
  with pytest.raises(measure.NoPlanFitsError):
    resolve((base + half_state) / margin)
  monkeypatch.setattr(measure, "device_memory_bytes", lambda: None)
  c.optim.state_memory = "auto"
  run = trainer.check_inputs(c, str(tmp_path / "cpu"))
  assert run.opt_state_memory == "device"         # nothing measured: the state stays
  run = trainer.check_inputs(memory_config(demo_data), str(tmp_path / "host"))
  layout = trainer.model_layout(run)
  assert {s.memory_kind for s in jax.tree.leaves(layout.opt_shardings)} == {"pinned_host"}
