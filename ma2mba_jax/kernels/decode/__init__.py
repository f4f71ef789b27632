"""The middle of one Mamba-2 layer's single-token step, from the in_proj output to the
out_proj input, as one function with two backends:

    yw, ss, conv_i, ssm = mixer_step(layer, raw, in_scale, params, conv, ssm,
                                     config=..., impl="auto")

  * "xla": plain JAX (`reference.py`), the oracle and the CPU path;
  * "pallas": one Pallas kernel (Triton lowering on GPU; `interpret=True` elsewhere), one
    program per (batch row, head) (`pallas.py`).
"auto" picks pallas on GPU, xla elsewhere. What the function computes (f32 inside, values
rounded to the compute dtype cd where `Mamba2Mixer.step` rounds them):

  zxbcdt = (raw * in_scale[:, None]) rounded to cd   (the in_proj output; raw = (h * w) @ W,
                                                      in_scale the RMS norm's 1/rms(h))
  xBC    = silu(conv over [conv state, xBC]) rounded to cd; new conv state = its last K-1
           inputs
  dt     = clip(softplus(dt + dt_bias), dt_limit); A = -exp(A_log)
  h      = exp(dt A) h + dt x B^T;  y = h C + D x, rounded to cd      (per head, [P, N])
  g      = y * silu(z)
  yw     = g * norm_weight rounded to cd   [B, E]  (out_proj's input before the gated norm's
                                                    per-group 1 / rms(g), applied by the caller)
  ss     = sum of g^2 per head             [B, H]  (the caller sums a group's columns; the
                                                    pallas backend with split > 1 gives
                                                    [B, H * split], a head's partial sums
                                                    side by side)

Layouts: raw [B, 2E + 2GN + H] f32; in_scale [B] f32; conv [L, B, C, K-1] f32 and ssm
[L, B, H, P, N] f32 are the whole LayerStates stacks; layer: int32 scalar (which layer's
slices are read). Returns yw, ss, the layer's new conv state [B, C, K-1] f32 and the ssm
stack with the layer's slice updated (in place in the pallas backend: the stack is aliased
to the output).

Axis legend: B batch, L layers, E inner width, C conv channels (E + 2GN), H heads, P head
dim, N state size, G groups, K conv width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

Array = jax.Array
IMPLS = ("auto", "xla", "pallas")


class MixerParams(NamedTuple):
  """One layer's mixer vectors, as stored (f32 or bf16; read as f32)."""
  conv_weight: Array   # [K, C]
  conv_bias: Array     # [C]
  dt_bias: Array       # [H]
  A_log: Array         # [H]
  D: Array             # [H]
  norm_weight: Array   # [E]


class Dims(NamedTuple):
  """The static shape and numerics of the step (from Mamba2Config)."""
  d_inner: int       # E
  n_heads: int       # H
  head_dim: int      # P
  d_state: int       # N
  n_groups: int      # G
  d_conv: int        # K
  dt_limit: tuple[float, float]
  compute_dtype: object


def dims_of(config) -> Dims:
  """Dims of a Mamba2Config."""
  return Dims(config.d_inner, config.n_heads, config.head_dim, config.d_state,
              config.n_groups, config.d_conv, tuple(config.dt_limit), config.compute_dtype)


def resolve_impl(impl: str, dims: Dims, platform: str | None = None) -> str:
  """'auto' -> 'pallas' on GPU when the kernel's loads are powers of two (P and N), else
  'xla'. An explicit name is checked and returned."""
  if impl not in IMPLS:
    raise ValueError(f"mixer_step: impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    if impl == "pallas" and not _pallas_fits(dims):
      raise ValueError(f"mixer_step: impl='pallas' needs head_dim and d_state to be powers "
                       f"of two, got head_dim={dims.head_dim}, d_state={dims.d_state}")
    return impl
  platform = platform or jax.default_backend()
  return "pallas" if platform == "gpu" and _pallas_fits(dims) else "xla"


def _pallas_fits(dims: Dims) -> bool:
  return all(n & (n - 1) == 0 for n in (dims.head_dim, dims.d_state))


def mixer_step(layer: Array, raw: Array, in_scale: Array, params: MixerParams, conv: Array,
               ssm: Array, *, dims: Dims, impl: str = "auto", interpret: bool | None = None,
               gated_rows: int | None = None, split: int | None = None,
               in_norm: tuple[int, float] | None = None, conv_in_place: bool = False,
               bc_prev: Array | None = None, prefetch: Array | None = None,
               prefetch_rows: int | None = None) -> tuple[Array, ...]:
  """See the module docstring. raw may have more rows and columns than read (the batch is
  in_scale's length). gated_rows: instead of yw and ss, return g [gated_rows, E] f32 and ss
  [gated_rows, H] (rows >= B: zero in xla, never written in pallas), as `gemv.out_proj`
  reads them. interpret (pallas only): run the kernel in the Pallas interpreter (default:
  when not on GPU). split (pallas only): programs per head (default `pallas.SPLIT`, at most
  head_dim). in_norm = (D, eps): in_scale is not read (only its length, the batch); raw
  has a column past the in_proj outputs, 2E+2GN+H, that holds the sum of squares of the
  norm's input h (`gemv.in_proj_reduce`), and 1/rms(h) = rsqrt(it / D + eps) is computed
  inside.

  conv_in_place=True: no fresh conv state; instead the conv stack itself is returned with
  the layer's x channels' new taps written (in place in the pallas backend: the stack is
  aliased to the output) and, if `bc_prev` [B, 2GN, K-1] is given, layer - 1's B/C
  channels set to it; a fifth output is this layer's new B/C taps [B, 2GN, K-1], for the
  next layer's call (or `write_bc` after the last layer). Every program of a group reads
  the layer's old B/C taps, so none may overwrite them in place: the next layer's kernel,
  which reads other taps, does.

  prefetch (pallas only, a hint; the results do not change): a matrix [R, C] whose first
  prefetch_rows rows (default `pallas.PREFETCH_ROWS`) extra programs of the kernel read
  into L2 for the next kernel (the layer's out_proj) while the mixer runs."""
  impl = resolve_impl(impl, dims)
  if impl == "xla":
    from ma2mba_jax.kernels.decode import reference
    return reference.mixer_step(layer, raw, in_scale, params, conv, ssm, dims=dims,
                                gated_rows=gated_rows, in_norm=in_norm,
                                conv_in_place=conv_in_place, bc_prev=bc_prev)
  from ma2mba_jax.kernels.decode import pallas
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return pallas.mixer_step(layer, raw, in_scale, params, conv, ssm, dims=dims,
                           interpret=interpret, gated_rows=gated_rows, split=split,
                           in_norm=in_norm, conv_in_place=conv_in_place, bc_prev=bc_prev,
                           prefetch=prefetch, prefetch_rows=prefetch_rows)


def write_bc(conv: Array, layer: int | Array, bc: Array, dims: Dims) -> Array:
  """The conv stack [L, B, C, K-1] with layer `layer`'s B/C channels set to bc [B, 2GN, K-1]
  (what `mixer_step(conv_in_place=True)` leaves to the next layer's call)."""
  return jax.lax.dynamic_update_slice(conv, bc[None].astype(conv.dtype),
                                      (layer, 0, dims.d_inner, 0))


__all__ = ["IMPLS", "MixerParams", "Dims", "dims_of", "resolve_impl", "mixer_step",
           "write_bc"]
