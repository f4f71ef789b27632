"""The `tpu` SSD backend (Pallas, Mosaic TPU lowering) checked from a CPU host.

1. Its kernels run under Pallas' TPU interpret mode (`interpret=True` ->
   pltpu.InterpretParams(): TPU memory spaces simulated on CPU) against the float64
   sequential oracle: outputs and the gradients of every input, for f32 and bf16, several
   groups, an initial state, T not a multiple of the chunk, D per channel; and with
   segment resets through the default path (interpret=None: the plain Pallas interpreter
   on CPU).
2. `jax.export(..., platforms=["tpu"])` of the forward, of the backward and of a whole
   370M LM train step (value_and_grad of the loss) holds the Mosaic kernels
   (`tpu_custom_call` with our kernel names), lowered on this CPU machine.

What this cannot show: that Mosaic compiles the kernels for a real chip (layouts, VMEM
limits) or how fast they run; BUILD.md, "Porting to TPU", says what to run on a TPU first.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.ssd import resolve_impl, ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents, rel_err

# ‖out − ref‖ / ‖ref‖ allowed against the f64 oracle. From
# `python -m tests.kernels.ssd_tpu_sweep` (jax 0.11.2, CPU, 2026-11-26, seeds 0..19 of every
# case in CASES, each run as in INTERPRET): the worst error seen over cases and seeds,
# times 2, rounded up to 1, 2 or 5 x 10^k. Worst seen (case, seed):
TOLERANCES = {
    "float32": {
        "y": 5e-7,               # 1.2e-07 f32_groups_init (14)
        "final_state": 5e-7,     # 1.9e-07 f32_reset (0)
        "dx": 5e-7,              # 1.4e-07 f32_reset (11)
        "dB": 5e-7,              # 1.5e-07 f32_reset (12)
        "dC": 5e-7,              # 1.4e-07 f32_groups_init (11)
        "ddt": 1e-6,             # 2.7e-07 f32_groups_init (13)
        "dinitial_state": 2e-7,  # 8.7e-08 f32_groups_init (19)
        "dA": 2e-6,              # 9.8e-07 f32_reset (18)
        "dD": 2e-6,              # 8.1e-07 f32_reset (18)
        "ddt_bias": 2e-6,        # 7.5e-07 f32_groups_init (7)
    },
    "bfloat16": {
        "y": 1e-2,               # 3.0e-03 bf16_init (10)
        "final_state": 5e-3,     # 2.0e-03 bf16_init (0)
        "dx": 1e-2,              # 3.4e-03 bf16_init (16)
        "dB": 1e-2,              # 3.1e-03 bf16_init (1)
        "dC": 1e-2,              # 3.4e-03 bf16_init (9)
        "ddt": 1e-2,             # 3.4e-03 bf16_init (6)
        "dinitial_state": 1e-2,  # 2.6e-03 bf16_init (7)
        # dA sums dt * d(cs) over every step and channel: cancellation gives it the heavy
        # tail over seeds that ssd_cases.py notes for the other backends.
        "dA": 2e-1,              # 5.7e-02 bf16_init (16)
        "dD": 1e-2,              # 4.8e-03 bf16_init (9)
        "ddt_bias": 5e-2,        # 1.4e-02 bf16_init (13)
    },
}

# Small shapes: TPU interpret mode runs every grid point through the simulator.
CASES = {
    # Two groups of two heads, an initial state, D per channel, T = 21 (3 chunks, padded).
    "f32_groups_init": Case(batch=1, seqlen=21, n_heads=4, head_dim=8, d_state=16,
                            n_groups=2, chunk_len=8, with_initial_state=True,
                            D_per_channel=True),
    # bf16 inputs (states and CB stored in bf16), batch 2, T = 19.
    "bf16_init": Case(batch=2, seqlen=19, n_heads=2, head_dim=8, d_state=16, chunk_len=8,
                      dtype="bfloat16", with_initial_state=True),
    # Packed segments: resets inside chunks and on a chunk boundary (see RESETS).
    "f32_reset": Case(batch=1, seqlen=20, n_heads=2, head_dim=8, d_state=16, chunk_len=8,
                      with_initial_state=True),
}
# Where each case's segments start ([B] tuples of positions); None: no reset.
RESETS = {"f32_groups_init": None, "bf16_init": None, "f32_reset": ((3, 8, 13),)}
SEEDS = {"f32_groups_init": 3, "bf16_init": 4, "f32_reset": 5}
# How each case runs the kernels: True is TPU interpret mode (pltpu.InterpretParams());
# None is the default, which on a CPU host is the plain Pallas interpreter (and Mosaic
# when lowered for TPU), so that path is checked numerically too.
INTERPRET = {"f32_groups_init": True, "bf16_init": True, "f32_reset": None}

_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def reset_mask(case: Case, starts) -> np.ndarray | None:
  """[B, T] bool, True at `starts` ([B] tuples of positions); None for no reset."""
  if starts is None:
    return None
  reset = np.zeros((case.batch, case.seqlen), bool)
  for row, positions in enumerate(starts):
    reset[row, list(positions)] = True
  return reset


def _runner(fn):
  """One compiled function (built without LLVM optimisation: interpret mode is slow to
  build) giving (y, final_state) and the gradient of sum(y*gy) + sum(state*gs) for every
  input; jit keeps it for every seed of a case."""
  def run(inp, cotangents):
    (y, state), vjp = jax.vjp(lambda i: fn(**i), inp)
    (grads,) = vjp((cotangents[0].astype(y.dtype), cotangents[1].astype(state.dtype)))
    return y, state, grads
  return jax.jit(run, compiler_options=_FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _runners(case: Case, starts, interpret):
  reset = reset_mask(case, starts)
  tpu = functools.partial(ssd, chunk_len=case.chunk_len, impl="tpu", interpret=interpret,
                          reset=None if reset is None else jnp.asarray(reset))
  return _runner(tpu), _runner(functools.partial(ssd_oracle, reset=reset))


def errors_against_oracle(case: Case, seed: int, starts=None, interpret=True
                          ) -> dict[str, float]:
  """Rel. error of y, final_state and every input's gradient of impl="tpu" (by default in
  TPU interpret mode) against the f64 oracle on the same (rounded) inputs, with segments
  starting at `starts` (see reset_mask). Also used by the tolerance sweep."""
  inputs = make_inputs(case, seed)
  cot = random_cotangents(case, seed)
  tpu, oracle = _runners(case, starts, interpret)
  y, state, grads = tpu(inputs, cot)
  with jax.enable_x64(True):
    inputs64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in inputs.items()}
    cot64 = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cot)
    y_ref, state_ref, grads_ref = oracle(inputs64, cot64)
  assert y.dtype == inputs["x"].dtype and y.shape == y_ref.shape
  assert state.dtype == jnp.float32 and state.shape == state_ref.shape
  assert set(grads) == set(inputs)
  for name, g in grads.items():
    assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
  errs = {"y": rel_err(y, y_ref), "final_state": rel_err(state, state_ref)}
  errs.update({f"d{k}": rel_err(grads[k], g) for k, g in grads_ref.items()})
  return errs


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpret_mode_matches_oracle(name):
  case = CASES[name]
  errs = errors_against_oracle(case, SEEDS[name], RESETS[name], INTERPRET[name])
  assert len(errs) == 2 + len(make_inputs(case, 0))
  for q, err in errs.items():
    tol = TOLERANCES[case.dtype][q]
    assert err < tol, f"{q}: rel err {err:.2e} >= {tol:.0e} ({name})"


def test_registry():
  assert resolve_impl("tpu") == "tpu"
  assert resolve_impl("auto", "tpu") == "tpu"
  assert resolve_impl("auto", "cpu") == "xla"
  inputs = make_inputs(Case(), seed=0)
  with pytest.raises(NotImplementedError, match="state_impl='fused'"):
    ssd(**inputs, chunk_len=8, impl="tpu", state_impl="fused")


# ------------------------------------------------------------------------------------
# Export for TPU from this CPU host: the modules hold the Mosaic kernels.

FORWARD_KERNELS = {"ssd_tpu_chunk_state", "ssd_tpu_state_pass", "ssd_tpu_chunk_scan_fwd"}
BACKWARD_KERNELS = {"ssd_tpu_state_pass_rev", "ssd_tpu_chunk_scan_bwd_dx",
                    "ssd_tpu_chunk_dcb", "ssd_tpu_head_contract"}


def mosaic_kernels(exported) -> set[str]:
  """Names of the Mosaic kernels in an exported module (asserting they are Mosaic calls)."""
  text = exported.mlir_module()
  assert "tpu_custom_call" in text
  return set(re.findall(r'kernel_name = "(ssd_tpu_\w+)"', text))


def _tpu_export(fn, *args):
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert exported.platforms == ("tpu",)
  return exported


def test_export_forward_and_backward_for_tpu():
  S = jax.ShapeDtypeStruct
  bf16 = jnp.bfloat16
  # The released layer's P, N and chunk; T = 2 chunks; 2 groups of 2 heads.
  b, t, h, p, g, n = 1, 512, 4, 64, 2, 128
  args = (S((b, t, h, p), bf16), S((b, t, h), jnp.float32), S((h,), jnp.float32),
          S((b, t, g, n), bf16), S((b, t, g, n), bf16), S((h,), jnp.float32),
          S((b, h, p, n), jnp.float32), S((b, t), jnp.bool_))

  def forward(x, dt, A, B, C, D, init, reset):
    return ssd(x, dt, A, B, C, D=D, initial_state=init, reset=reset, impl="tpu",
               chunk_len=256)

  def loss(*args):
    y, state = forward(*args)
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(state ** 2)

  assert mosaic_kernels(_tpu_export(forward, *args)) == FORWARD_KERNELS
  grads = _tpu_export(jax.value_and_grad(loss, argnums=tuple(range(7))), *args)
  assert mosaic_kernels(grads) == FORWARD_KERNELS | BACKWARD_KERNELS
  # Without TPU lowering the same call runs no Mosaic kernel: interpret=None picks per
  # platform (lax.platform_dependent), so a CPU export holds plain XLA instead.
  cpu = jax.export.export(jax.jit(forward), platforms=["cpu"])(*args)
  assert "tpu_custom_call" not in cpu.mlir_module()


def test_export_370m_train_step_for_tpu():
  from flax import nnx
  from ma2mba_jax.models.mamba2 import Mamba2LM
  from ma2mba_jax.models.presets import mamba2_config
  from ma2mba_jax.train.loss import blockwise_cross_entropy, shift_targets

  config = mamba2_config("370m", compute_dtype="bfloat16", ssd_impl="tpu")
  # Abstract parameters: nothing of the 370M model is allocated on this host.
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0))))
  assert sum(np.prod(a.shape) for a in jax.tree.leaves(params)) > 3.5e8

  def loss_fn(params, tokens):
    model = nnx.merge(graphdef, params)
    h, _ = model.apply_layers(model.embed(tokens), model.init_states(tokens.shape[0]))
    targets, weights = shift_targets(tokens, jnp.ones(tokens.shape, jnp.float32))
    total, count = blockwise_cross_entropy(h, model.head, targets, weights, block_len=512)
    return total / count

  tokens = jax.ShapeDtypeStruct((1, 512), jnp.int32)      # 2 chunks of 256: only lowering
  step = _tpu_export(jax.value_and_grad(loss_fn), params, tokens)
  assert mosaic_kernels(step) == FORWARD_KERNELS | BACKWARD_KERNELS
