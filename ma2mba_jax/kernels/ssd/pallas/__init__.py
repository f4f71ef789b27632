"""`impl="pallas"`: the chunked SSD on Pallas kernels (Triton lowering on GPU, the Pallas
interpreter elsewhere). `kernels.py` holds the kernels; the algorithm around them and its
`jax.custom_vjp` backward are `kernels/ssd/chunked.py` (shared with `triton` and `tpu`)."""

from ma2mba_jax.kernels.ssd.pallas import kernels
from ma2mba_jax.kernels.ssd.chunked import Options, make_core

ssd_pallas = make_core(kernels, "pallas")

__all__ = ["ssd_pallas", "Options", "kernels"]
