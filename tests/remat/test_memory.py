"""MA-GC's memory from XLA's compiled memory analysis of the gradient function (no run).

Quadrupling T must multiply MA-GC(auto)'s temp memory by at most about 2.6 (the paper's
(L*S)^(2/3) law gives 4^(2/3) = 2.52), while `none` grows about 4x; and the memory model's
prediction must track the measured temp bytes across T and L.
"""

import types

import jax
import jax.numpy as jnp
import pytest

from ma2mba_jax.remat import magc
from ma2mba_jax.remat.policies import apply_with_remat
from ma2mba_jax.remat.settings import RematSettings
from tests.remat import toy_stack as ts


def toy_model_cfg(n_layers):
  """The toy stack's sizes in the planner's terms (C_L, C_S, C_grid, C_state)."""
  return types.SimpleNamespace(
      d_model=ts.D, d_inner=ts.H * ts.P, d_state=ts.N, conv_dim=ts.D,
      d_in_proj=ts.H * ts.P + ts.H + 2 * ts.N, chunk_len=8, n_layers=n_layers)


def grad_temp_bytes(policy, n_layers, seqlen, l=None, s=None):
  cfg = RematSettings(policy=policy, l=l, s=s, cell_saves="nothing", save_names=())
  params = ts.init_params(jax.random.key(0), n_layers)
  conv0, ssm0 = ts.zero_states(n_layers, 1)

  def loss(params, h0):
    h, _, _ = apply_with_remat(ts.layer_fn, params, h0, conv0, ssm0, cfg)
    return jnp.sum(h)

  h0 = jax.ShapeDtypeStruct((1, seqlen, ts.D), jnp.float32)
  analysis = jax.jit(jax.grad(loss)).lower(params, h0).compile().memory_analysis()
  return analysis.temp_size_in_bytes


def magc_auto(n_layers, seqlen):
  auto = RematSettings(l="auto", s="auto")
  l, s, predicted = magc.resolve(auto, toy_model_cfg(n_layers), seqlen, bytes_per_element=4)
  return grad_temp_bytes("magc", n_layers, seqlen, l, s), predicted


@pytest.fixture(scope="module")
def measurements():
  out = {}
  for n_layers, seqlen in [(8, 1024), (8, 4096), (16, 4096)]:
    out[(n_layers, seqlen)] = magc_auto(n_layers, seqlen)
  for seqlen in (1024, 4096):
    out[("none", seqlen)] = grad_temp_bytes("none", 8, seqlen)
  return out


def test_magc_grows_sublinearly_none_linearly(measurements):
  magc_growth = measurements[(8, 4096)][0] / measurements[(8, 1024)][0]
  none_growth = measurements[("none", 4096)] / measurements[("none", 1024)]
  assert magc_growth <= 2.6, magc_growth
  assert 3.6 <= none_growth <= 4.4, none_growth


def test_model_prediction_tracks_measurement(measurements):
  ratios = [value[0] / value[1] for key, value in measurements.items() if key[0] != "none"]
  # One constant factor (bytes of XLA's workspace per modelled element) explains all of them.
  assert max(ratios) / min(ratios) < 2.0, ratios
  predicted_growth_T = measurements[(8, 4096)][1] / measurements[(8, 1024)][1]
  measured_growth_T = measurements[(8, 4096)][0] / measurements[(8, 1024)][0]
  assert abs(measured_growth_T / predicted_growth_T - 1) < 0.35
  predicted_growth_L = measurements[(16, 4096)][1] / measurements[(8, 4096)][1]
  measured_growth_L = measurements[(16, 4096)][0] / measurements[(8, 4096)][0]
  assert abs(measured_growth_L / predicted_growth_L - 1) < 0.35
