"""Running a first Pallas kernel must not make earlier jitted functions retrace (see
ma2mba_jax/kernels/__init__.py). Checked in a fresh interpreter: in the test process
another test may already have run a Pallas kernel."""

import os
import subprocess
import sys

_SCRIPT = """
import jax, jax.numpy as jnp
import ma2mba_jax.models.decode  # what a user imports first (it imports ma2mba_jax.kernels)
from jax.experimental import pallas as pl

traces = []

@jax.jit
def f(x):
  traces.append(1)
  return x + 1

f(jnp.zeros(4))
def add_one(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1
pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
               interpret=True)(jnp.zeros(8))
f(jnp.zeros(4))
print("traces", len(traces))
"""


def test_a_first_pallas_kernel_does_not_retrace_earlier_jits():
  out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "traces 1" in out.stdout, out.stdout + out.stderr[-2000:]
