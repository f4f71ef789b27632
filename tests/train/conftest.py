"""A tiny synthetic dataset shared by the training tests."""

import pytest

from ma2mba_jax.data import synthetic


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_data")
  synthetic.generate(str(out), seed=0, size="tiny", frame_size=32)
  return str(out)
