"""Where one Mamba-2 layer's time goes: matmuls, the SSD, and everything else.

  python -m ma2mba_jax.bench.layer --model=2.7b --lengths=16384,65536 --json=out.json

For one layer of the preset (random weights, f32 master, bf16 compute, batch 1), times the
forward and the forward+backward (gradients for the parameters and the input) of
  layer     the whole block: norm, in_proj, conv1d + SiLU, SSD, gated norm, out_proj, residual,
            with the first of `--block_impls` (each other one is timed as `layer_<impl>`)
  matmuls   in_proj and out_proj alone, on the same shapes (bf16 in, f32 accumulation)
  ssd       the SSD kernel alone (`--ssd_impl`), on the layer's x, dt, B, C
and reports `other` = layer - matmuls - ssd: the memory-bound elementwise work (norms,
conv, gates, dtype casts, layout copies) that neither kernel covers. What MA-GC training
costs per token follows from these: a cell with `cell_saves=layers` runs three forwards and
one backward of every layer.
"""

from __future__ import annotations

import functools

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "2.7b", "Mamba-2 preset (models/presets.py).")
_LENGTHS = flags.DEFINE_list("lengths", ["16384"], "Tokens per call.")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "auto", "SSD backend.")
_BLOCK_IMPLS = flags.DEFINE_list("block_impls", ["fused", "autodiff"],
                                 "Mamba2Config.block_impl values to time ('layer' is the first).")
_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median).")
_JSON = flags.DEFINE_string("json", None, "Write results here.")


def measure(seqlen: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ma2mba_jax.bench import common
  from ma2mba_jax.kernels.ssd import ssd
  from ma2mba_jax.models.mamba2 import Mamba2Block, block_apply
  from ma2mba_jax.models.presets import mamba2_config

  cfg = mamba2_config(_MODEL.value, compute_dtype=_DTYPE.value, ssd_impl=_SSD_IMPL.value)
  cd = jnp.dtype(_DTYPE.value)
  impls = list(_BLOCK_IMPLS.value)
  _, params = nnx.split(Mamba2Block(cfg.replace(block_impl=impls[0]), rngs=nnx.Rngs(0)))
  keys = iter(jax.random.split(jax.random.key(1), 16))
  normal = lambda shape, dtype=jnp.float32, scale=1.0: (
      scale * jax.random.normal(next(keys), shape)).astype(dtype)

  h = normal((1, seqlen, cfg.d_model))
  conv0 = jnp.zeros((1, cfg.conv_dim, cfg.d_conv - 1), jnp.float32)
  ssm0 = jnp.zeros((1, cfg.n_heads, cfg.head_dim, cfg.d_state), jnp.float32)

  def layer_fn(impl):
    graphdef = nnx.split(nnx.eval_shape(
        lambda: Mamba2Block(cfg.replace(block_impl=impl), rngs=nnx.Rngs(0))))[0]

    def layer(params, h):
      out, _, _ = block_apply(graphdef, params, h, conv0, ssm0)
      return out
    return layer

  w_in = normal((cfg.d_model, cfg.d_in_proj), scale=cfg.d_model ** -0.5)
  w_out = normal((cfg.d_inner, cfg.d_model), scale=cfg.d_inner ** -0.5)
  u = normal((1, seqlen, cfg.d_model), cd)
  y = normal((1, seqlen, cfg.d_inner), cd)

  def matmuls(w_in, w_out, u, y):
    mm = lambda a, w: jnp.einsum("...i,io->...o", a, w.astype(cd),
                                 preferred_element_type=jnp.float32).astype(cd)
    return mm(u, w_in), mm(y, w_out)

  x = normal((1, seqlen, cfg.n_heads, cfg.head_dim), cd)
  dt = normal((1, seqlen, cfg.n_heads), cd, 0.5)
  B = normal((1, seqlen, cfg.n_groups, cfg.d_state), cd)
  C = normal((1, seqlen, cfg.n_groups, cfg.d_state), cd)
  A = -jnp.exp(normal((cfg.n_heads,), scale=0.5))
  ssd_fn = functools.partial(ssd, dt_softplus=True, chunk_len=cfg.chunk_len, impl=cfg.ssd_impl)

  def ssd_call(x, dt, A, B, C):
    return ssd_fn(x, dt, A, B, C)[0]

  def fwd_bwd(fn, n_args):
    def loss(*args):
      outs = fn(*args)
      return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(outs))
    return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))

  parts = {
      "layer": (layer_fn(impls[0]), (params, h)),
      **{f"layer_{impl}": (layer_fn(impl), (params, h)) for impl in impls[1:]},
      "matmuls": (matmuls, (w_in, w_out, u, y)),
      "ssd": (ssd_call, (x, dt, A, B, C)),
  }
  rows = []
  times = {}
  for name, (fn, args) in parts.items():
    fwd = jax.jit(fn)
    bwd = fwd_bwd(fn, len(args))
    times[name] = (common.median_ms(lambda: fwd(*args), repeats=_REPEATS.value),
                   common.median_ms(lambda: bwd(*args), repeats=_REPEATS.value))
  matmul_flops = 2 * seqlen * (cfg.d_model * cfg.d_in_proj + cfg.d_inner * cfg.d_model)
  for name, (fwd_ms, bwd_ms) in times.items():
    row = {"part": name, "T": seqlen, "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms}
    if name == "matmuls":
      row["fwd_TFLOP_s"] = matmul_flops / fwd_ms / 1e9
      row["fwd_bwd_TFLOP_s"] = 3 * matmul_flops / bwd_ms / 1e9
    rows.append(row)
  layer_fwd, layer_bwd = times["layer"]
  rows.append({"part": "other", "T": seqlen,
               "fwd_ms": layer_fwd - times["matmuls"][0] - times["ssd"][0],
               "fwd_bwd_ms": layer_bwd - times["matmuls"][1] - times["ssd"][1]})
  for row in rows:
    row["fwd_share"] = row["fwd_ms"] / layer_fwd
    row["fwd_bwd_share"] = row["fwd_bwd_ms"] / layer_bwd
  # A whole-model estimate: L layers, and the MA-GC cell_saves=layers pattern (3 fwd + bwd).
  magc_s = cfg.n_layers * (2 * layer_fwd + layer_bwd) / 1e3
  rows.append({"part": f"{cfg.n_layers} layers, 3 fwd + bwd", "T": seqlen,
               "fwd_bwd_ms": magc_s * 1e3, "tokens_per_s": seqlen / magc_s})
  return rows


def main(argv):
  del argv
  from ma2mba_jax.bench import common
  rows = []
  for seqlen in map(int, _LENGTHS.value):
    rows.extend(measure(seqlen))
  common.print_table(rows, ["part", "T", "fwd_ms", "fwd_bwd_ms", "fwd_share", "fwd_bwd_share",
                            "fwd_TFLOP_s", "fwd_bwd_TFLOP_s", "tokens_per_s"])
  common.write_json(_JSON.value, {"env": common.environment(), "model": _MODEL.value,
                                  "ssd_impl": _SSD_IMPL.value,
                                  "block_impls": _BLOCK_IMPLS.value, "rows": rows})


if __name__ == "__main__":
  app.run(main)
