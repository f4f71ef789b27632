"""Decoding on the GPU (marker `gpu`: skipped without an NVIDIA GPU; run through the device
tool: `pytest -q -m gpu tests/gpu/test_decode_gpu.py`).

  * the decode kernel (kernels/decode, Pallas -> Triton) against its float64 oracle, and
    with its L2 prefetch of another matrix (the same outputs);
  * the fused decode step against the reference step, float32, over many tokens;
  * greedy decoding by the host loop (one dispatch per token) and by the device loop
    (lax.while_loop) give the same tokens on small random models, for the unrolled and the
    fused steps, float32 and bfloat16 compute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.infer.sample import Sampler, SamplingParams
from ma2mba_jax.models.mamba2 import Mamba2Config, Mamba2LM
from tests.infer.test_fused_decode import step_errors
from tests.kernels.decode_mixer_cases import CASES, TOLERANCES, errors, prefetch_unchanged

pytestmark = pytest.mark.gpu

# The fused step against the reference step in float32 on the GPU: XLA's f32 matmuls there
# may run on TF32 units, which both steps use in different places (the folded norms), so
# the bound is that of TF32 rounding, not of the CPU test's 2e-6.
GPU_STEP_TOL = {"logits": 1e-2, "conv": 1e-2, "ssm": 1e-2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_the_float64_oracle_on_gpu(name):
  case = CASES[name]
  errs = errors(case, seed=7, impl="pallas", interpret=False)
  print(name, errs)
  assert all(err < TOLERANCES[case.dtype] for err in errs.values()), (name, errs)


@pytest.mark.parametrize("name,rows,in_place", [("g1_f32", 64, False), ("g2_bf16_b1", 32, True)])
def test_kernel_prefetch_leaves_every_output_unchanged_on_gpu(name, rows, in_place):
  prefetch_unchanged(CASES[name], rows, in_place, interpret=False, shape=(64, 2048))


@pytest.mark.parametrize("matmul,batch", [("xla", 2), ("xla_t", 2), ("pallas", 2),
                                          ("pallas", 5), ("reduce", 1), ("reduce", 5)])
@pytest.mark.parametrize("variant", ["g1_tied", "g2_untied"])
def test_fused_step_equals_the_reference_step_on_gpu(variant, matmul, batch):
  """xla_t: the matrices output-major (the Sampler's fused step); pallas at batch 2 runs the
  gemv kernels' vector path, at 5 their tl.dot path; reduce: XLA's in_proj reduction,
  out_proj_folded, the mixer's in_norm and in-place conv states."""
  worst = step_errors(seed=3, impl="pallas" if matmul == "pallas" else "auto",
                      variant=variant, matmul=matmul, batch=batch)
  print(variant, matmul, worst)
  assert all(worst[k] < GPU_STEP_TOL[k] for k in GPU_STEP_TOL), worst


SMALL = Mamba2Config(d_model=256, n_layers=4, vocab_size=1000, d_state=128, head_dim=64,
                     chunk_len=64)


@pytest.mark.parametrize("step_impl", ["unrolled", "fused", "fused_gemv", "fused_reduce",
                                       "fused_mixed"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_greedy_host_and_device_loops_give_the_same_tokens(step_impl, compute_dtype):
  config = SMALL.replace(compute_dtype=compute_dtype)
  llm = Mamba2LM(config, rngs=nnx.Rngs(0))
  sampler = Sampler(llm, vocab_size=config.vocab_size, step_impl=step_impl)
  prompts = np.random.default_rng(0).integers(0, config.vocab_size, (3, 17))
  params = SamplingParams(max_new_tokens=64, stop_on_repeat=False)
  for prompt in prompts:
    logits, states = jax.jit(lambda t: llm(t, return_states=True))(jnp.asarray(prompt)[None])
    device = sampler.generate(states, logits[0, -1], params, decode_impl="device")
    host = sampler.generate(states, logits[0, -1], params, decode_impl="host")
    assert len(host.sampled) == 64
    assert device.sampled == host.sampled


@pytest.mark.parametrize("config", ["default", "persistent", "ahead_evict_split2"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_kernels_match_the_reference_on_gpu(config, rows):
  """The decode GEMVs compiled by Triton (the vector path: in_proj's default runs
  persistent programs, out_proj's loads tiles ahead with evict_first), bf16, against the
  f32-accumulated einsums, as tests/kernels/test_decode_gemv.py checks them interpreted."""
  from ma2mba_jax.kernels.decode import gemv
  from tests.kernels import test_decode_gemv as t

  cfg, cd = t.CONFIGS[config], jnp.bfloat16
  x = t._inputs(rows, rows, cd)
  out = gemv.in_proj(x["h"], x["w_norm"], x["w_in"], eps=t.EPS, config=cfg)
  t.check(out, t.in_proj_reference(x["h"], x["w_norm"], x["w_in"]), cd)
  out = gemv.out_proj(x["g"], x["ss"], x["w_gate"], x["w_out"], x["h"], eps=t.EPS,
                      n_groups=2, rows=rows, config=cfg)
  ref = t.out_proj_reference(x["g"], x["ss"], x["w_gate"], x["w_out"], x["h"], 2, rows)
  t.check(out, ref, cd, base=x["h"])
