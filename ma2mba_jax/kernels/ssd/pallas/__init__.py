"""`impl="pallas"`: the chunked SSD on Pallas kernels (Triton lowering on GPU, the Pallas
interpreter elsewhere). `kernels.py` holds the kernels; the algorithm around them and its
`jax.custom_vjp` backward are `kernels/ssd/chunked.py` (shared with `triton` and `tpu`)."""

from ma2mba_jax.kernels.ssd.pallas import kernels
from ma2mba_jax.kernels.ssd.chunked import Options, make_core

# The Pallas lowering's own best settings where they differ from Options' (which suit the
# jax-triton kernels), from a sweep of each forward kernel alone at the 3.1B prefill step's
# shape (T 9,216, 80 heads; H100, BENCHMARKS.md "Prefill and decoding, session 16"):
# chunk_state with 4 warps (0.181 -> 0.127 ms), chunk_scan_fwd without software pipelining
# (0.313 -> 0.258). warps_state also sets the fused state_scan's warps (state_impl="fused",
# not the default; not re-measured with 4).
TUNED_OPTIONS = {"warps_state": 4, "stages_chunk_fwd": 1}

ssd_pallas = make_core(kernels, "pallas", defaults=TUNED_OPTIONS)

__all__ = ["ssd_pallas", "Options", "TUNED_OPTIONS", "kernels"]
