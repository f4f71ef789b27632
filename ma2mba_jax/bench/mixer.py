"""The decode step's middle kernel (kernels/decode/pallas.mixer_step) at one preset's shapes,
batch 1, over its launch settings: programs per head (split) and warps per program.

  python -m ma2mba_jax.bench.mixer --preset=2.7b --splits=1,2,4,8 --warps=1,2,4

Each setting is timed as decoding calls it: one jitted function runs the kernel once for
every layer of the [L, ...] state stacks (the layer index a traced scalar, the SSM stack
updated in place), `--dispatches` such functions are dispatched and waited for once; us =
median wall time per kernel call (launch gaps included). --profile_dir adds gpu_us, the
kernel's own time from a jax.profiler trace (bench/kernel_profile.py). Every setting's
outputs are checked against split=1's (column err: largest relative error).
"""

from __future__ import annotations

import functools
import itertools

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "2.7b", "Mamba-2 preset (models/presets.py).")
_SPLITS = flags.DEFINE_list("splits", ["1", "2", "4", "8"], "Programs per head.")
_WARPS = flags.DEFINE_list("warps", ["1", "2", "4"], "Warps per program.")
_DISPATCHES = flags.DEFINE_integer("dispatches", 4, "Functions dispatched per timed batch.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed batches (median reported).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Also time the kernel on the GPU here.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from ma2mba_jax.bench import common
  from ma2mba_jax.kernels.decode import MixerParams, dims_of, pallas
  from ma2mba_jax.models.presets import mamba2_config
  from ma2mba_jax.testing import rel_err

  c = mamba2_config(_PRESET.value, compute_dtype="bfloat16")
  dims = dims_of(c)
  layers, conv_ch = c.n_layers, c.d_inner + 2 * c.n_groups * c.d_state
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape)
  raw = normal(1, c.d_in_proj).astype(jnp.bfloat16)
  params = MixerParams(0.3 * normal(c.d_conv, conv_ch), 0.1 * normal(conv_ch),
                       normal(c.n_heads), jnp.log(1 + jnp.abs(normal(c.n_heads))),
                       normal(c.n_heads), 1 + 0.1 * normal(c.d_inner))
  conv = normal(layers, 1, conv_ch, c.d_conv - 1)
  ssm0 = 0.1 * normal(layers, 1, c.n_heads, c.head_dim, c.d_state)
  interpret = jax.default_backend() != "gpu"
  rows, reference = [], None
  for split, warps in itertools.product(map(int, _SPLITS.value), map(int, _WARPS.value)):
    @functools.partial(jax.jit, donate_argnums=0)
    def every_layer(ssm, split=split, warps=warps):
      outs = []
      for i in range(layers):
        g, ss, conv_i, ssm = pallas.mixer_step(
            jnp.int32(i), raw, jnp.ones((1,), jnp.float32), params, conv, ssm, dims=dims,
            interpret=interpret, num_warps=warps, gated_rows=1, split=split)
        outs.append((g, ss.reshape(1, c.n_heads, -1).sum(-1), conv_i))
      return outs, ssm

    state = [ssm0 + 0.0]                 # threaded through the calls (donated)

    def call():
      outs, state[0] = every_layer(state[0])
      return outs

    try:
      outs = jax.block_until_ready(call())
    except Exception as err:  # noqa: BLE001 - a setting Triton rejects is a result
      rows.append({"split": split, "warps": warps, "error": f"{type(err).__name__}: "
                   f"{str(err)[:160]}"})
      continue
    flat = jax.tree.leaves(outs)      # the first call's: from ssm0
    reference = reference or flat
    err = max(float(rel_err(a, b)) for a, b in zip(flat, reference))

    def batch():
      for _ in range(_DISPATCHES.value):
        out = call()
      return out

    us = common.median_ms(batch, warmup=1, repeats=_REPEATS.value) * 1e3 / (
        _DISPATCHES.value * layers)
    row = {"split": split, "warps": warps, "programs": c.n_heads * split, "us": us,
           "err": err}
    if _PROFILE.value:
      from ma2mba_jax.bench import kernel_profile
      prof = kernel_profile.profile(call,
                                    f"{_PROFILE.value}/{split}_{warps}", calls=2)
      mixer = [r for r in prof if "kernel" in r["kernel"]]
      row["gpu_us"] = sum(r["us/call"] for r in mixer) / layers if mixer else None
    rows.append(row)
  print(f"\n{_PRESET.value} mixer_step, batch 1, {layers} layers a call, "
        f"{common.environment()['device']}")
  common.print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
  common.write_json(_JSON.value, {"bench": "mixer", "preset": _PRESET.value, "rows": rows,
                                  "environment": common.environment()})


if __name__ == "__main__":
  app.run(main)
