"""Run with 8 simulated CPU devices: the sequence-parallel SSD against the one-device SSD,
outputs and every gradient; prints RESULT lines (used by test_ssd_sequence_parallel.py)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.sequence_parallel import ssd_sequence_parallel
from tests.kernels.ssd_cases import Case, make_inputs, random_cotangents, rel_err


def error_fn(mesh, n_seq: int, n_groups: int, with_init: bool):
  """-> errors(seed) -> {quantity: rel. err of the sequence-parallel SSD vs one device}.
  Compiled once, for every seed."""
  case = Case(batch=2, seqlen=8 * n_seq, n_heads=4, n_groups=n_groups, chunk_len=4,
              with_initial_state=with_init)

  def loss(fn, inp, cot):
    y, s = fn(**inp)
    return jnp.sum(y * cot[0]) + jnp.sum(s * cot[1])

  one = lambda **i: ssd(**i, chunk_len=4, impl="xla")
  many = lambda **i: ssd_sequence_parallel(**i, mesh=mesh, chunk_len=4, impl="xla")
  one_fwd, many_fwd = jax.jit(one), jax.jit(many)
  one_grad = jax.jit(jax.grad(lambda i, c: loss(one, i, c)))
  many_grad = jax.jit(jax.grad(lambda i, c: loss(many, i, c)))

  def errors(seed: int) -> dict[str, float]:
    inputs = make_inputs(case, seed=seed)
    cot = random_cotangents(case, seed=seed)
    (y1, s1), (y2, s2) = one_fwd(**inputs), many_fwd(**inputs)
    g1, g2 = one_grad(inputs, cot), many_grad(inputs, cot)
    errs = {"y": rel_err(y2, y1), "final_state": rel_err(s2, s1)}
    errs.update({f"d{k}": rel_err(g2[k], g1[k]) for k in g1})
    return errs
  return errors


def main(n_seq: int, n_groups: int, with_init: bool, seeds: list[int] | None) -> None:
  """Without seeds: one RESULT line {quantity: err} for the test's seed (n_seq + n_groups).
  With seeds (tolerance_sweep.py): one RESULT line [seed, {quantity: err}] per seed."""
  devices = np.array(jax.devices()[:n_seq])
  mesh = Mesh(devices, ("sequence",))
  errors = error_fn(mesh, n_seq, n_groups, with_init)
  if seeds is None:
    print("RESULT " + json.dumps(errors(n_seq + n_groups)))
    return
  for seed in seeds:
    print("RESULT " + json.dumps([seed, errors(seed)]), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1",
       [int(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else None)
