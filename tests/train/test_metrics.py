"""The console line and the per-device peak memory of the trainer's metrics."""

from unittest import mock

from ma2mba_jax.train import metrics


def test_format_line_shows_every_devices_peak():
  scalars = {"loss": 1.0, "peak_memory_gib": 61.84, "peak_memory_gib/0": 61.84,
             "peak_memory_gib/1": 60.5, "peak_memory_gib/10": 1.0}
  line = metrics.format_line(2, 3, 10, scalars)
  assert "mem 61.8 GiB (61.8/60.5/1.0 per device)" in line


def test_format_line_one_device():
  line = metrics.format_line(2, 3, 10, {"loss": 1.0, "peak_memory_gib": 62.93})
  assert "mem 62.9 GiB |" in line and "per device" not in line


class _Device:
  def __init__(self, peak):
    self._peak = peak

  def memory_stats(self):
    return None if self._peak is None else {"peak_bytes_in_use": self._peak * 2**30}


def test_report_takes_the_fullest_device_and_each():
  with mock.patch.object(metrics.jax, "local_devices", lambda: [_Device(3.0), _Device(5.0)]):
    out = metrics.Progress(0, 10).report(1)
    assert out == {"peak_memory_gib": 5.0, "peak_memory_gib/0": 3.0, "peak_memory_gib/1": 5.0}
    assert metrics.device_memory_gib() == 5.0
  with mock.patch.object(metrics.jax, "local_devices", lambda: [_Device(None)]):
    assert metrics.Progress(0, 10).report(1) == {}
    assert metrics.device_memory_gib() is None
