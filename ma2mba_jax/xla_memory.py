"""Bytes of pytrees and of XLA's compiled plans (any backend, nothing executed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# The parts of a compiled memory analysis, by their `<part>_size_in_bytes` field.
FOOTPRINT = ("temp", "output", "argument")


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def compiled_footprint(jitted: Callable, *args, parts: Sequence[str] = FOOTPRINT,
                       exclude: Any = None, **kwargs) -> int | None:
  """The bytes of `parts` ("temp", "output", "argument") of XLA's plan for
  jitted(*args, **kwargs), minus the bytes of the pytree `exclude` (e.g. the parameters,
  resident anyway); None where the backend gives no memory analysis."""
  analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if analysis is None:
    return None
  planned = sum(getattr(analysis, f"{part}_size_in_bytes") for part in parts)
  return int(planned - (tree_bytes(exclude) if exclude is not None else 0))
