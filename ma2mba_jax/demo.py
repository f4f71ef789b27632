"""The built-in demo, end to end on CPU: `scripts/demo.sh` (or `python -m ma2mba_jax.demo`).

Today it checks the SSD core against the float64 oracle on random inputs and times it; the
data, training and evaluation steps join here as they land, keeping this entry the same.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from ma2mba_jax.kernels.ssd import ssd
from ma2mba_jax.kernels.ssd.oracle import ssd_oracle

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its outputs.")


def check_ssd() -> float:
  """Relative error of the chunked SSD against the f64 recurrence on fresh inputs."""
  k = jax.random.split(jax.random.key(0), 5)
  b, t, h, p, n = 2, 300, 4, 16, 32
  inputs = dict(x=jax.random.normal(k[0], (b, t, h, p)), dt=jax.random.normal(k[1], (b, t, h)),
                A=-jnp.exp(jax.random.normal(k[2], (h,))),
                B=jax.random.normal(k[3], (b, t, 1, n)), C=jax.random.normal(k[4], (b, t, 1, n)))
  y, _ = jax.jit(lambda i: ssd(**i, chunk_len=64))(inputs)
  with jax.enable_x64(True):
    ref, _ = ssd_oracle(**{kk: np.asarray(v, np.float64) for kk, v in inputs.items()})
  ref = np.asarray(ref)
  return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  err = check_ssd()
  logging.info("SSD chunked vs float64 recurrence: relative error %.2e", err)
  print(f"[demo] SSD core vs float64 oracle: relative error {err:.2e}")


if __name__ == "__main__":
  app.run(main)
