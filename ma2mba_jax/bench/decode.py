"""Decoding benchmark of the LM alone: tokens/s of each LM step (infer/sample.py's
step_impl) in the device and host loops, from the same prompt state, and whether their
greedy tokens agree. Random weights made on the device, matrices in --param_dtype.

  python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 --json=bench_out/decode.json
  python -m ma2mba_jax.bench.decode --preset=tiny --tokens=32                    # CPU

The 2.7B preset is the LM of the 3.1B Video-Ma2mba (its decoding reads only the LM).
Run it under different XLA_FLAGS (e.g. --xla_gpu_enable_command_buffer=...) in separate
processes to compare XLA's command buffers (CUDA graphs) on the while loop.

Columns: step (unrolled: models/decode.decode_step; fused: fused_decode_step, one kernel
per layer's middle; fused_gemv: the same with the matmuls and norms as Pallas kernels too;
fused_reduce: fused's function in three kernels a layer, in_proj as XLA's reduction;
fused_mixed: fused_reduce's kernels for one row, fused for more; scan: Mamba2LM.step), loop
(device: one dispatch for the answer; host: one per token), tok/s (median of --repeats
answers of --tokens greedy tokens, no stop rule), ms/token, TB/s (`bytes_per_token` over
the time of a step: the least a step moves, the matrices once and the recurrent states read
and written; 5.74 GB for the 2.7B LM at batch 1), same as host (the device loop's tokens
equal the host loop's of the same step), parts from unrolled at (first token where this
step's greedy answer differs from the unrolled step's, '-' nowhere), kernels/token
(kernel-launching ops of the compiled step's optimized HLO, bench.common.kernel_counts);
with --profile_dir, gpu ms/token and gaps ms/token (see the flag), each step's top
kernels per token and its GPU timeline (kernel_profile.idle: the waits between kernels by
size, and the kernel pairs around the longest).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from ma2mba_jax.bench import common
from ma2mba_jax.infer.checkpoint import cast_matrices
from ma2mba_jax.infer.sample import STEP_IMPLS, Sampler, SamplingParams
from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.presets import mamba2_config

_PRESET = flags.DEFINE_string("preset", "2.7b", "Mamba-2 preset (models/presets.py).")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows decoded together.")
_TOKENS = flags.DEFINE_integer("tokens", 256, "Greedy tokens per answer.")
_PROMPT = flags.DEFINE_integer("prompt", 0, "Random prompt tokens read before decoding (0: "
                               "zero states and random first logits).")
_STEPS = flags.DEFINE_list("step_impls", ["unrolled", "fused"], "LM steps to time.")
_LOOPS = flags.DEFINE_list("loops", ["device", "host"], "Decode loops to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed answers per (step, loop).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["float32", "bfloat16"],
                                   "Matmul / SSD input dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["float32", "bfloat16"],
                                 "Dtype of the weight matrices (vectors stay f32).")
_COUNT = flags.DEFINE_list("count_kernels", ["unrolled", "fused", "scan"], "Steps whose "
                           "compiled HLO is counted (GPU only; each is one more compile).")
_LABEL = flags.DEFINE_string("label", "", "A name for this run in the table (e.g. the XLA "
                             "flags it ran under).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Also profile one device-loop answer "
                               "of each step under this folder (bench/kernel_profile.py): "
                               "columns gpu ms/token (the GPU's kernel busy time) and gaps "
                               "ms/token (wall minus busy: launches and idle), and the top "
                               "kernels and the GPU timeline printed.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")


def build(preset: str) -> Mamba2LM:
  config = mamba2_config(preset, compute_dtype=_COMPUTE_DTYPE.value)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(cast_matrices(Mamba2LM(config, rngs=nnx.Rngs(0)),
                                                  jnp.dtype(_PARAM_DTYPE.value))))()
  return nnx.merge(graphdef, state)


def bytes_per_token(config, batch: int) -> int:
  """The least a decode step must move at `batch` rows: every layer's two matrices and the
  head's [V, D] in the compute dtype (the decode steps' copies), once; the SSM and conv
  states read and written in f32. (Norm and mixer vectors, a few MB, left out.)"""
  c = config
  itemsize = jnp.dtype(c.compute_dtype).itemsize
  matrices = c.n_layers * (c.d_model * c.d_in_proj + c.d_inner * c.d_model)
  head = c.padded_vocab_size * c.d_model
  channels = c.d_inner + 2 * c.n_groups * c.d_state
  state = c.n_layers * batch * (c.n_heads * c.head_dim * c.d_state + channels * (c.d_conv - 1))
  return (matrices + head) * itemsize + 2 * 4 * state


def step_kernels(llm: Mamba2LM, sampler: Sampler) -> int:
  """Kernel-launching ops of the Sampler's compiled LM step (--batch rows)."""
  token = jnp.zeros((_BATCH.value,), jnp.int32)
  cache = llm.init_states(_BATCH.value)
  compiled = jax.jit(sampler.lm_step).lower(sampler.device_weights(), token, cache).compile()
  return sum(common.kernel_counts(compiled.as_text()).values())


def main(argv):
  del argv
  unknown = set(_STEPS.value) - set(STEP_IMPLS)
  if unknown:
    raise app.UsageError(f"--step_impls: unknown {sorted(unknown)}; expected {STEP_IMPLS}")
  start = time.perf_counter()
  llm = build(_PRESET.value)
  vocab = llm.config.vocab_size
  if _PROMPT.value:
    prompt = jax.random.randint(jax.random.key(1), (_BATCH.value, _PROMPT.value), 0, vocab)
    logits, states = jax.jit(lambda t: llm(t, return_states=True))(prompt)
    logits = logits[:, -1]
  else:  # zero states, random first logits (no prefill to compile)
    states = llm.init_states(_BATCH.value)
    logits = jax.random.normal(jax.random.key(1), (_BATCH.value, llm.config.padded_vocab_size))
  jax.block_until_ready(states)
  build_s = time.perf_counter() - start
  params = SamplingParams(max_new_tokens=_TOKENS.value, stop_on_repeat=False)
  moved = bytes_per_token(llm.config, _BATCH.value)
  rows, answers = [], {}
  for impl in _STEPS.value:
    sampler = Sampler(llm, vocab_size=vocab, step_impl=impl)
    kernels = (step_kernels(llm, sampler)
               if jax.default_backend() == "gpu" and impl in _COUNT.value else None)
    for loop in _LOOPS.value:
      def decode():
        if loop == "host":
          return [sampler.generate(jax.tree.map(lambda x, b=b: x[:, b:b + 1], states),
                                   logits[b], params, decode_impl="host")
                  for b in range(_BATCH.value)]
        return sampler.generate_batch(states, logits, params, decode_impl="device")
      begin = time.perf_counter()
      answer = decode()                                          # compiles
      compile_s = time.perf_counter() - begin
      seconds = []
      for _ in range(_REPEATS.value):
        begin = time.perf_counter()
        decode()
        seconds.append(time.perf_counter() - begin)
      answers[(impl, loop)] = [g.sampled for g in answer]
      tokens = sum(len(g.sampled) for g in answer)
      median = statistics.median(seconds)
      per_token = median * 1e3 / len(answer[0].sampled)
      row = {"run": _LABEL.value, "step": impl, "loop": loop, "batch": _BATCH.value,
             "tok/s": tokens / median, "ms/token": per_token,
             "TB/s": moved / per_token / 1e9, "first call s": compile_s,
             "kernels/token": kernels}
      if _PROFILE.value and loop == "device" and jax.default_backend() == "gpu":
        from ma2mba_jax.bench import kernel_profile
        steps = len(answer[0].sampled)
        kernel_rows, _ = kernel_profile.profile_steps(
            decode, f"{_PROFILE.value}/{impl}", steps, f"{impl} step, {steps} tokens", top=12)
        busy = sum(r["us/call"] for r in kernel_rows) / 1e3          # a token
        row.update({"gpu ms/token": busy, "gaps ms/token": per_token - busy})
      rows.append(row)
  for row in rows:
    mine = answers[(row["step"], row["loop"])]
    host = answers.get((row["step"], "host"))
    row["same as host"] = None if host is None else mine == host
    base = answers.get(("unrolled", row["loop"]))
    parts = "-"
    if base is not None:
      parts = next((i for a, b in zip(base, mine) for i, (x, y) in enumerate(zip(a, b))
                    if x != y), "-")
    row["parts from unrolled at"] = parts
  print(f"\n{_PRESET.value} LM, {_COMPUTE_DTYPE.value} compute, {_PARAM_DTYPE.value} matrices, "
        f"{_TOKENS.value} greedy tokens, {common.environment()['device']}, built and "
        f"prompted in {build_s:.1f} s, {moved / 1e9:.3f} GB moved a step {_LABEL.value}")
  common.print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
  common.write_json(_JSON.value, {"bench": "decode", "preset": _PRESET.value,
                                  "label": _LABEL.value, "rows": rows,
                                  "environment": common.environment()})


if __name__ == "__main__":
  app.run(main)
