"""`impl="tpu"`: the chunked SSD on Pallas kernels with the Mosaic TPU lowering.

`kernels.py` holds the kernels (same contract as pallas/kernels.py, TPU layouts inside);
the algorithm around them, its `jax.custom_vjp` backward and the `reset` segment masks are
the shared glue of kernels/ssd/chunked.py.

Options: `interpret` (None, the default: Mosaic when lowered for TPU, Pallas' TPU
interpret mode when lowered for any other platform, chosen per lowering platform with
`lax.platform_dependent`; True: always interpret mode; False: always Mosaic, e.g. to
export for TPU explicitly), `state_f32`, `cb_f32` (as in chunked.Options). The GPU block
and warp options are accepted and ignored (one program per whole chunk tile here).
"""

from __future__ import annotations

import jax

from ma2mba_jax.kernels.ssd import chunked
from ma2mba_jax.kernels.ssd.tpu import kernels


def ssd_tpu(x, dt, A, B, C, D, initial_state, *, chunk_len: int, interpret=None,
            reset: jax.Array | None = None, **options):
  """SSD core (registry contract) on the Mosaic TPU kernels."""
  if options.get("state_impl", "split") != "split":
    raise NotImplementedError(f"ssd tpu: state_impl={options['state_impl']!r} has no TPU "
                              f"kernel; only 'split' is implemented")
  opts = chunked.Options(chunk_len=chunk_len, interpret=interpret, **options)
  return chunked.run(kernels, opts, x, dt, A, B, C, D, initial_state, reset)


__all__ = ["ssd_tpu", "kernels"]
