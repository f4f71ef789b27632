"""MA-GC's wavefront over a `seq` axis (remat/pipeline.py) against MA-GC on one device, on
a toy layer stack with a conv-like and an SSM-like state: L=5 layers in groups of l=2 (the
last group, of 1, is a second wavefront), 4 pieces of 12 tokens in time blocks of 5 (a
shorter last block), nonzero initial states. Compares the outputs, every layer's final
states and the gradients of a random projection of them with respect to the parameters,
the input and the initial states. Needs 4 devices: run by tests/train/multi_device_step.py
(`pipeline` argument) in test_sharding.py's 8-device subprocess.

Letters: L layers, B batch, T time, D width, K-1 carried conv inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par
from ma2mba_jax.remat import magc
from ma2mba_jax.remat.planner import MemoryConstants, magc_memory
from ma2mba_jax.remat.settings import RematSettings

N_LAYERS, GROUP, N_PIECES, PIECE, BLOCK, WIDTH, BATCH, KEEP = 5, 2, 4, 12, 5, 8, 2, 2


def toy_layer(p, h, conv, ssm):
  """h [B, t, D]; conv [B, D, K-1] (the K-1 inputs before h); ssm [B, D]."""
  x = jnp.tanh(h @ p["w"])                                         # [B, t, D]
  xin = jnp.concatenate([jnp.swapaxes(conv, 1, 2), x], axis=1)     # [B, K-1+t, D]
  z = xin[:, 2:] + 0.5 * xin[:, 1:-1] + 0.25 * xin[:, :-2]         # [B, t, D]
  decay = jax.nn.sigmoid(p["a"])                                   # [D]

  def step(m, zt):
    m = decay * m + zt
    return m, m
  ssm, ms = jax.lax.scan(step, ssm, jnp.swapaxes(z, 0, 1))
  return h + 0.3 * jnp.swapaxes(ms, 0, 1), jnp.swapaxes(xin[:, -KEEP:], 1, 2), ssm


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {"w": f(N_LAYERS, WIDTH, WIDTH) / np.sqrt(WIDTH), "a": f(N_LAYERS, WIDTH)}
  h = f(BATCH, N_PIECES * PIECE, WIDTH)
  conv, ssm = f(N_LAYERS, BATCH, WIDTH, KEEP), f(N_LAYERS, BATCH, WIDTH)
  probes = (f(BATCH, N_PIECES * PIECE, WIDTH), f(N_LAYERS, BATCH, WIDTH, KEEP),
            f(N_LAYERS, BATCH, WIDTH))
  return (params, h, conv, ssm), probes


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(seed: int, devices) -> dict[str, float]:
  """Largest relative error (by the reference's largest entry) of the outputs and of each
  gradient, wavefront against one device."""
  (params, h, conv, ssm), probes = _inputs(seed)
  remat = RematSettings(policy="magc", l=GROUP, s=BLOCK)

  def objective(outs):
    return sum(jnp.sum(o * p) for o, p in zip(outs, probes))

  def one_device(params, h, conv, ssm):
    return magc.apply_magc(toy_layer, params, h, conv, ssm, remat)

  mesh = jax.make_mesh((N_PIECES,), ("seq",), devices=devices[:N_PIECES])

  def piece(params, h, conv, ssm):
    with seq_par.sequence_axis("seq", N_PIECES):
      return magc.apply_magc(toy_layer, params, h, conv, ssm, remat)

  split = jax.shard_map(piece, mesh=mesh, in_specs=(P(), P(None, "seq"), P(), P()),
                        out_specs=(P(None, "seq"), P(), P()), check_vma=False)
  put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  args = (put(params, P()), put(h, P(None, "seq")), put(conv, P()), put(ssm, P()))
  errors = {}
  for name, fn, inputs in (("one", one_device, (params, h, conv, ssm)),
                           ("wavefront", split, args)):
    outs = jax.jit(fn)(*inputs)
    grads = jax.jit(jax.grad(lambda *a: objective(fn(*a)), argnums=(0, 1, 2, 3)))(*inputs)
    errors[name] = (outs, grads)
  (outs_1, grads_1), (outs_n, grads_n) = errors["one"], errors["wavefront"]
  result = {f"out_{k}": _rel(a, b) for k, a, b in zip(("h", "conv", "ssm"), outs_n, outs_1)}
  names = ("params", "h", "conv", "ssm")
  for name, got, want in zip(names, grads_n, grads_1):
    result[f"grad_{name}"] = max(_rel(a, b) for a, b in
                                 zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return result


def _wavefront_grad_temp(devices, n_layers: int, group: int, n: int, t: int, s: int,
                         width: int) -> float:
  """XLA's compiled temp bytes of the gradient (parameters and input) of the toy stack's
  wavefront: n_layers of width x width in groups of `group`, n pieces of t tokens, blocks of
  s, batch 1."""
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {"w": f(n_layers, width, width) / np.sqrt(width), "a": f(n_layers, width)}
  h, conv, ssm = f(1, n * t, width), f(n_layers, 1, width, KEEP), f(n_layers, 1, width)
  remat = RematSettings(policy="magc", l=group, s=s)
  mesh = jax.make_mesh((n,), ("seq",), devices=devices[:n])

  def piece(params, h, conv, ssm):
    with seq_par.sequence_axis("seq", n):
      return magc.apply_magc(toy_layer, params, h, conv, ssm, remat)

  split = jax.shard_map(piece, mesh=mesh, in_specs=(P(), P(None, "seq"), P(), P()),
                        out_specs=(P(None, "seq"), P(), P()), check_vma=False)
  loss = lambda *a: sum(jnp.sum(o) for o in split(*a))
  put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  args = (put(params, P()), put(h, P(None, "seq")), put(conv, P()), put(ssm, P()))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
  return float(compiled.memory_analysis().temp_size_in_bytes)


def temp_bytes(devices) -> dict[str, float]:
  """XLA's compiled temp memory of the wavefront's gradient on a toy whose weights dominate
  (8 layers of 256 x 256 in 4 groups over 4 pieces of 64 tokens, blocks of 16), beside the
  bytes of the weights. Saving the group parameters a tick slices out (what the wavefront
  did before its tick checkpoint) adds (G+n-1)/G = 7/4 of the weights: 8.87 MB of temp
  against 5.10 MB without (2026-11-26, CPU), 2.10 MB of weights."""
  n_layers, width = 8, 256
  return {"temp_bytes": _wavefront_grad_temp(devices, n_layers, group=2, n=4, t=64, s=16,
                                             width=width),
          "weight_bytes": float(n_layers * width * width * 4)}


def checkpoint_growth(devices) -> dict[str, float]:
  """The wavefront's checkpoints against the memory model (remat/planner.py, which the
  trainer's 'auto' l and s use under a seq axis): XLA's compiled temp memory of the toy's
  gradient, activation-dominated (8 layers of width 64 in groups of 2, pieces of 1024
  tokens, blocks of 16), on 2 and on 8 devices. The pieces are the same, so what grows is
  the 6 more ticks of stacked checkpoints, which the model counts as magc_memory(n=8) -
  magc_memory(n=2) with the toy's constants (C_L = D: h; C_S = D (K-1) + D: the conv and
  SSM states; the cell's terms do not change with n). 2026-11-27, CPU: measured 2.172 MB
  against the model's 2.163 MB (pieces of 2048: 2.89 vs 2.88 for n 2 -> 4 -> 8; l=4,
  3.68 vs 3.67 MB for n 4 -> 8)."""
  n_layers, group, t, s, width = 8, 2, 1024, 16, 64
  k = MemoryConstants(c_layer=width, c_seq=width * (KEEP + 1), c_grid=0, c_state=0)
  temp = {n: _wavefront_grad_temp(devices, n_layers, group, n, t, s, width) for n in (2, 8)}
  model = lambda n: magc_memory(n_layers, t, group, s, k, pipeline_devices=n) * 4
  return {"measured_growth": temp[8] - temp[2], "model_growth": model(8) - model(2)}
