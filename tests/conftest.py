"""Shared test setup: CPU by default, GPU tests skipped where there is no GPU."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound on CPU: LLVM's optimisations cost more than they save on these
# tiny shapes (about 3x faster overall). Numerics are unchanged.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()


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


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache per test session: functions compiled again with
  the same shapes (e.g. a resumed training run) load instead of recompiling."""
  import jax
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield
