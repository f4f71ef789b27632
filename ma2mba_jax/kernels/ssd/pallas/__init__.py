"""`impl="pallas"`: the chunked SSD on Pallas kernels (Triton lowering on GPU, the Pallas
interpreter elsewhere). `kernels.py` holds the kernels, `chunked.py` the algorithm around
them and its `jax.custom_vjp` backward (shared with the `triton` backend)."""

from ma2mba_jax.kernels.ssd.pallas import kernels
from ma2mba_jax.kernels.ssd.pallas.chunked import Options, make_core

ssd_pallas = make_core(kernels, "pallas")

__all__ = ["ssd_pallas", "Options", "kernels"]
