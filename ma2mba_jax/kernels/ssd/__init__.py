"""Mamba-2 state space duality (SSD) scan.

Public entry: `ssd(x, dt, A, B, C, ...) -> (y, final_state)`; see `api.ssd`.
Backends: `xla` (pure-JAX chunked reference, `reference.py`) and the GPU kernels that
register themselves in `registry.py`. `oracle.py` is the float64 sequential recurrence
that every backend is tested against.
"""

from ma2mba_jax.kernels.ssd.api import ssd, process_dt, reset_from_segment_ids
from ma2mba_jax.kernels.ssd.registry import available_backends, resolve_impl

__all__ = ["ssd", "process_dt", "reset_from_segment_ids", "available_backends",
           "resolve_impl"]
