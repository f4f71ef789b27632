"""Shared test setup: CPU by default, GPU tests skipped where there is no GPU."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _has_gpu() -> bool:
  try:
    import jax
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if any(item.get_closest_marker("gpu") for item in items) and not _has_gpu():
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run through the device tool)")
    for item in items:
      if item.get_closest_marker("gpu"):
        item.add_marker(skip)
