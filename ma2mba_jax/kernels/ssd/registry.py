"""Backend registry for the SSD core.

A backend implements the *core* scan, after the public entry has applied the dt
preprocessing (bias, softplus, limit):

    core(x, dt, A, B, C, D, initial_state, *, chunk_len, **options) -> (y, final_state)

    x  [B, T, H, P]  (bf16 or f32)      dt [B, T, H] f32, already >= 0
    A  [H] f32 (negative)               B, C [B, T, G, N]
    D  [H, P] f32 or None               initial_state [B, H, P, N] f32 or None
    y  [B, T, H, P] in x.dtype          final_state [B, H, P, N] f32

With packed segments the entry also passes `reset=` ([B, T] bool, True where a segment
starts; semantics in api.ssd); it passes nothing when the caller gives no reset, so a
backend without segment support keeps working for unpacked rows.

Backends are named by a module path and loaded on first use, so that importing this
package never imports a GPU-only library (jax-triton cannot be imported without a GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import jax

# name -> (module path, attribute, platforms it runs on natively)
_BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "xla": ("ma2mba_jax.kernels.ssd.reference", "ssd_chunked", ("cpu", "gpu", "tpu")),
    # Pallas kernels (Triton lowering); elsewhere they run in the Pallas interpreter.
    "pallas": ("ma2mba_jax.kernels.ssd.pallas", "ssd_pallas", ("gpu",)),
    # Triton kernels through jax-triton (NVIDIA GPUs only; imported only when picked).
    "triton": ("ma2mba_jax.kernels.ssd.triton", "ssd_triton", ("gpu",)),
    # Pallas kernels (Mosaic TPU lowering); elsewhere they run in Pallas' TPU interpret
    # mode. Checked on CPU only (interpret mode, TPU export): see BUILD.md, "Porting to TPU".
    "tpu": ("ma2mba_jax.kernels.ssd.tpu", "ssd_tpu", ("tpu",)),
    # Pallas kernels (Mosaic GPU lowering: TMA, warpgroup matmuls; Hopper). Off GPU they
    # run in the Mosaic GPU interpreter. See BUILD.md, "Mosaic GPU".
    "mosaic_gpu": ("ma2mba_jax.kernels.ssd.mosaic_gpu", "ssd_mosaic_gpu", ("gpu",)),
}

# What `impl="auto"` picks on each platform, best first; the first one registered whose
# optional library is installed wins. gpu: with kernel version 2, triton was the fastest
# correct backend forward and forward+backward at every length measured on the H100, pallas
# second (BENCHMARKS.md, "SSD kernels", run 2); pallas needs no extra library. tpu: the
# Mosaic kernels (never yet run on a TPU; impl="xla" is the fallback).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("triton", "pallas", "xla"),
    "tpu": ("tpu", "xla"),
    "cpu": ("xla",),
}

IMPLS = ("auto", "xla", "pallas", "triton", "tpu", "mosaic_gpu")


def register_backend(name: str, module: str, attr: str, platforms: tuple[str, ...]) -> None:
  """Makes `impl=name` available. `module.attr` is imported lazily on first use."""
  _BACKENDS[name] = (module, attr, platforms)


def set_auto_order(platform: str, names: tuple[str, ...]) -> None:
  """Sets which backends `impl="auto"` tries on `platform`, best first."""
  _AUTO_ORDER[platform] = names


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """Maps `auto` to a concrete backend name for `platform` (default: JAX's default backend)."""
  if impl not in IMPLS and impl not in _BACKENDS:
    raise ValueError(f"ssd: impl={impl!r} is not one of {sorted(set(IMPLS) | set(_BACKENDS))}")
  if impl != "auto":
    if impl not in _BACKENDS:
      raise ValueError(f"ssd: backend impl={impl!r} is not registered here "
                       f"(registered: {available_backends()})")
    return impl
  platform = platform or jax.default_backend()
  for name in _AUTO_ORDER.get(platform, ("xla",)):
    if name in _BACKENDS and _installed(name):
      return name
  return "xla"


# Backends that need a library beyond the pinned stack (the `gpu` extra installs it).
_REQUIRES = {"triton": "jax_triton"}


def _installed(name: str) -> bool:
  requirement = _REQUIRES.get(name)
  return requirement is None or importlib.util.find_spec(requirement) is not None


def get_backend(name: str) -> Callable:
  module, attr, _ = _BACKENDS[name]
  return getattr(importlib.import_module(module), attr)
