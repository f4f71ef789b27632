"""`impl="triton"`: the chunked SSD on Triton kernels called through jax-triton.

Same algorithm and backward as the Pallas backend (`kernels/ssd/chunked.py`), with the same
kernels written directly in Triton (`kernels.py`). NVIDIA GPUs only: importing this
package imports jax_triton, which needs a GPU, so the registry imports it only when it is
picked.
"""

from ma2mba_jax.kernels.ssd.chunked import Options, make_core

try:
  from ma2mba_jax.kernels.ssd.triton import kernels
except ImportError as err:
  raise ImportError("ssd: impl='triton' needs triton and jax-triton on a machine with an "
                    "NVIDIA GPU; elsewhere use impl='pallas' (interpret mode) or 'xla'") from err

ssd_triton = make_core(kernels, "triton", default_interpret=False)

__all__ = ["ssd_triton", "Options", "kernels"]
