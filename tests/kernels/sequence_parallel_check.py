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


def main(n_seq: int, n_groups: int, with_init: bool) -> None:
  devices = np.array(jax.devices()[:n_seq])
  mesh = Mesh(devices, ("sequence",))
  case = Case(batch=2, seqlen=8 * n_seq, n_heads=4, n_groups=n_groups, chunk_len=4,
              with_initial_state=with_init)
  inputs = make_inputs(case, seed=n_seq + n_groups)
  cot = random_cotangents(case, seed=3)

  def loss(fn, inp):
    y, s = fn(**inp)
    return jnp.sum(y * cot[0]) + jnp.sum(s * cot[1])

  one = lambda **i: ssd(**i, chunk_len=4, impl="xla")
  many = lambda **i: ssd_sequence_parallel(**i, mesh=mesh, chunk_len=4, impl="xla")
  (y1, s1), (y2, s2) = jax.jit(one)(**inputs), jax.jit(many)(**inputs)
  g1 = jax.jit(jax.grad(lambda i: loss(one, i)))(inputs)
  g2 = jax.jit(jax.grad(lambda i: loss(many, i)))(inputs)
  errs = {"y": rel_err(y2, y1), "final_state": rel_err(s2, s1)}
  errs.update({f"d{k}": rel_err(g2[k], g1[k]) for k in g1})
  print("RESULT " + json.dumps(errs))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
