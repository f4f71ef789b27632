"""models/decode.fused_decode_step (each layer's middle one kernels/decode.mixer_step call,
the RMS norms folded around the matmuls; or, matmul="pallas", the matmuls and norms as
kernels/decode.gemv kernels) against the reference step `decode_step`, in float32 from
random states, token after token: logits and both states. Both backends of the middle on
CPU (xla; pallas in interpret mode); one and two groups, tied and untied head. The
Sampler's host and device loops on the fused step give the same tokens.
Sweep: `python -m tests.infer.test_fused_decode` (seeds 0-19)."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.models.decode import (decode_step, decode_weights, fused_decode_step,
                                      padded_decode_weights)
from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.testing import rel_err

TOKENS = 24
# Worst relative error over model/input seeds 0-19 of the sweep below (CPU, 2026-11-26,
# every variant and both backends, over the 24 tokens): logits 8.9e-7 (g1_tied pallas seed
# 2), conv state 4.4e-7 (g1_tied pallas seed 18), ssm state 2.4e-7 (g2_untied pallas seed
# 11); the folded norms round in a different order. The gemv variant (matmul="pallas",
# pallas interpret): logits 6.8e-7, conv 2.9e-7, ssm 2.3e-7. Tolerances: 2x the worst,
# rounded up to 1, 2 or 5 x 10^k. The matrices output-major ("xla_t", the Sampler's fused
# step; 2026-11-27, seeds 0-19): logits 8.9e-7, conv 4.3e-7, ssm 2.4e-7, inside the same.
# matmul="reduce" (XLA's in_proj reduction, pallas interpret; session 11, seeds 0-19):
# logits 8.8e-7, conv 4.0e-7, ssm 2.4e-7, inside the same.
TOL = {"logits": 2e-6, "conv": 1e-6, "ssm": 5e-7}
VARIANTS = {"g1_tied": dict(n_groups=1, tie_embeddings=True),
            "g2_untied": dict(n_groups=2, tie_embeddings=False)}


@functools.lru_cache(maxsize=None)
def _steps(variant: str, impl: str, matmul: str = "xla"):
  """(config, jitted weights maker, jitted reference step, jitted fused step), compiled once
  per variant and backend (the seeds only change the arguments)."""
  config = mamba2_config("tiny", compute_dtype="float32", **VARIANTS[variant])
  llm = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.split(llm)[0]
  block_graphdef = llm.split_layers()[0]
  weights = jax.jit(lambda p: decode_weights(nnx.merge(graphdef, p)))
  padded = jax.jit(lambda p: padded_decode_weights(nnx.merge(graphdef, p)))
  padded8 = jax.jit(lambda p: padded_decode_weights(nnx.merge(graphdef, p), multiple=8))
  transposed = jax.jit(lambda p: decode_weights(nnx.merge(graphdef, p), transposed=True))
  ref_step = jax.jit(lambda w, t, c: decode_step(config, block_graphdef, w, t, c))
  # "xla_t": the matrices output-major (the Sampler's fused step).
  fused = jax.jit(lambda w, t, c: fused_decode_step(
      config, w, t, c, impl=impl, matmul=matmul.removesuffix("_t"),
      transposed=matmul == "xla_t"))
  # reduce: in_proj padded as the Sampler pads it for fused_reduce (sample.REDUCE_PAD)
  fused_weights = {"pallas": padded, "reduce": padded8, "xla_t": transposed}.get(matmul,
                                                                               weights)
  return config, weights, fused_weights, ref_step, fused


def step_errors(seed: int, impl: str, variant: str, matmul: str = "xla",
                batch: int = 2) -> dict[str, float]:
  """Worst relative error of the fused step's logits and states against decode_step's,
  over TOKENS tokens from the same random states (float32). matmul="pallas": the step with
  the gemv kernels (impl is then pallas; batch <= 4 takes their vector path, 5-16 their
  tl.dot path on 16 padded rows)."""
  config, make_weights, make_fused_weights, ref_step, fused = _steps(variant, impl, matmul)
  llm = Mamba2LM(config, rngs=nnx.Rngs(seed))
  weights = make_weights(nnx.split(llm)[1])
  fused_weights = make_fused_weights(nnx.split(llm)[1])
  rng = np.random.default_rng(seed)
  states = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32),
                        llm.init_states(batch))
  ref = new = states
  worst = dict.fromkeys(TOL, 0.0)
  for token in rng.integers(0, config.vocab_size, (TOKENS, batch)):
    token = jnp.asarray(token, jnp.int32)
    logits_ref, ref = ref_step(weights, token, ref)
    logits_new, new = fused(fused_weights, token, new)
    for name, a, b in (("logits", logits_new, logits_ref), ("conv", new.conv, ref.conv),
                       ("ssm", new.ssm, ref.ssm)):
      worst[name] = max(worst[name], rel_err(a, b))
  return worst


@pytest.mark.parametrize("impl,variant,matmul,batch", [
    ("xla", "g1_tied", "xla", 2), ("xla", "g2_untied", "xla_t", 2),
    ("pallas", "g1_tied", "xla_t", 2), ("pallas", "g2_untied", "pallas", 2),
    ("pallas", "g1_tied", "pallas", 5), ("pallas", "g1_tied", "reduce", 1),
    ("pallas", "g2_untied", "reduce", 5)])
def test_fused_step_equals_the_reference_step(impl, variant, matmul, batch):
  worst = step_errors(seed=3, impl=impl, variant=variant, matmul=matmul, batch=batch)
  assert all(worst[k] < TOL[k] for k in TOL), worst


def test_fused_mixed_step_is_fused_reduce_for_one_row_and_fused_for_more():
  """fused_mixed (the GPU default) decodes one row with fused_reduce's kernels and more rows
  with the fused step, both on fused_gemv's padded, output-major weights: the same tokens
  as those steps on their own weights."""
  config = mamba2_config("tiny", compute_dtype="bfloat16")
  llm = Mamba2LM(config, rngs=nnx.Rngs(2))
  samplers = {impl: Sampler(llm, vocab_size=config.vocab_size, step_impl=impl)
              for impl in ("fused_mixed", "fused_reduce", "fused")}
  prompt = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (3, 7)))
  logits, states = llm(prompt, return_states=True)
  params = SamplingParams(max_new_tokens=12, stop_on_repeat=False)
  one = jax.tree.map(lambda a: a[:, :1], states)
  single = {impl: s.generate(one, logits[0, -1], params).sampled for impl, s in samplers.items()}
  assert single["fused_mixed"] == single["fused_reduce"]
  rows = {impl: [g.sampled for g in s.generate_batch(states, logits[:, -1], params)]
          for impl, s in samplers.items()}
  assert rows["fused_mixed"] == rows["fused"] and all(len(r) == 12 for r in rows["fused"])


@pytest.mark.parametrize("step_impl", ["fused", "fused_gemv", "fused_reduce", "fused_mixed"])
def test_fused_host_and_device_loops_give_the_same_tokens(step_impl):
  config = mamba2_config("tiny", compute_dtype="bfloat16")
  llm = Mamba2LM(config, rngs=nnx.Rngs(1))
  sampler = Sampler(llm, vocab_size=config.vocab_size, step_impl=step_impl)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, 9)))
  logits, states = llm(prompt, return_states=True)
  params = SamplingParams(max_new_tokens=20, stop_on_repeat=False)
  device = sampler.generate(states, logits[0, -1], params, decode_impl="device")
  host = sampler.generate(states, logits[0, -1], params, decode_impl="host")
  assert device.sampled == host.sampled and len(host.sampled) == 20


def test_auto_step_is_the_unrolled_one_on_cpu():
  llm = Mamba2LM(mamba2_config("tiny"), rngs=nnx.Rngs(0))
  assert Sampler(llm, vocab_size=250).step_impl == "unrolled"  # "fused_mixed" on GPU
  with pytest.raises(ValueError, match="step_impl must be one of"):
    Sampler(llm, vocab_size=250, step_impl="fast")


def main(seeds: int = 20, only: str | None = None) -> None:
  for variant in VARIANTS:
    for impl, matmul in (("xla", "xla"), ("xla", "xla_t"), ("pallas", "xla_t"),
                         ("pallas", "pallas"), ("pallas", "reduce")):
      if only and matmul != only:
        continue
      worst = dict.fromkeys(TOL, (0.0, -1))
      for seed in range(seeds):
        for k, v in step_errors(seed, impl, variant, matmul).items():
          if v > worst[k][0]:
            worst[k] = (v, seed)
      print(variant, impl, matmul,
            {k: f"{v:.2e} (seed {s})" for k, (v, s) in worst.items()}, flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, *sys.argv[2:3])
