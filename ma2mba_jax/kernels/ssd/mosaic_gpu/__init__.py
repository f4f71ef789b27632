"""`impl="mosaic_gpu"`: the chunked SSD on Pallas kernels with the Mosaic GPU lowering
(Hopper, sm_90: TMA copies, warpgroup matmuls, pipelined loops).

`kernels.py` holds the six kernels (same contract as pallas/kernels.py); the algorithm
around them, its `jax.custom_vjp` backward and the `reset` segment masks are the shared
glue of kernels/ssd/chunked.py. The per-chunk state recurrence (`state_pass`) is a
Mosaic GPU kernel too.

Options: `interpret` (None, the default: the Mosaic GPU interpreter off GPU, compiled
kernels on GPU), `state_f32`, `cb_f32`, `dcb_heads`, `contract_heads`, `block_s` (as in
chunked.Options), `num_stages` (chunk_scan_fwd / bwd_dx: >= 2 copies only the causal
tiles and overlaps them with the matmuls, 1 copies every tile first). The Triton-only
options (warps, block_l/p/r) are accepted and ignored: tiles here are 64 rows. Needs
chunk_len, head dim and state size multiples of 64. f32 inputs run bf16 matmul operands.
"""

from __future__ import annotations

import jax

from ma2mba_jax.kernels.ssd import chunked
from ma2mba_jax.kernels.ssd.mosaic_gpu import kernels


def ssd_mosaic_gpu(x, dt, A, B, C, D, initial_state, *, chunk_len: int, interpret=None,
                   reset: jax.Array | None = None, **options):
  """SSD core (registry contract) on the Mosaic GPU kernels."""
  if options.get("state_impl", "split") != "split":
    raise NotImplementedError(f"ssd mosaic_gpu: state_impl={options['state_impl']!r} has no "
                              f"Mosaic GPU kernel; only 'split' is implemented")
  kernels.check_shapes(chunk_len, x.shape[3], B.shape[3])
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  opts = chunked.Options(chunk_len=chunk_len, interpret=bool(interpret), **options)
  return chunked.run(kernels, opts, x, dt, A, B, C, D, initial_state, reset)


__all__ = ["ssd_mosaic_gpu", "kernels"]
