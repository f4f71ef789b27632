"""Device mesh and sharding rules, in one place.

Mesh axes: `data` and `fsdp`; the batch is split over both. Three layouts, picked by
`config.mesh` (see `layout_shardings`):

  data parallel   fsdp=1, zero1=False   parameters and optimizer state replicated
  ZeRO-1          zero1=True            parameters replicated over `data` (sharded over
                                        `fsdp` if fsdp > 1), optimizer state sharded over
                                        `data` x `fsdp`
  FSDP            fsdp=N                parameters and optimizer state sharded over `fsdp`

An array is sharded on its largest axis that the shard count divides; arrays smaller than
`MIN_SHARD_SIZE` elements stay replicated. With one device everything is replicated.
Multi-host: call `jax.distributed.initialize()` before building the mesh (main.py does when
asked).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements stay replicated: sharding them saves little and costs a
# collective each.
MIN_SHARD_SIZE = 2**14


def make_mesh(mesh_cfg: Any, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = mesh_cfg.fsdp if mesh_cfg.fsdp != -1 else None
  data = mesh_cfg.data if mesh_cfg.data != -1 else None
  if fsdp is None and data is None:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  if fsdp is None:
    fsdp = n // data
  if data is None:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} must equal the {n} devices")
  return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def array_spec(shape: tuple[int, ...], mesh_shape: dict[str, int], axes: tuple[str, ...],
               min_size: int = MIN_SHARD_SIZE) -> P:
  """Splits the largest axis of `shape` that the product of `axes`' sizes divides over those
  mesh axes (size-1 axes left out); small or indivisible arrays are replicated."""
  axes = tuple(a for a in axes if mesh_shape[a] > 1)
  n_shards = int(np.prod([mesh_shape[a] for a in axes], dtype=np.int64))
  if n_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = axes[0] if len(axes) == 1 else axes
      return P(*spec)
  return P()


def _opt_spec(shape: tuple[int, ...], mesh_shape: dict[str, int], zero1: bool) -> P:
  if zero1:
    # `fsdp` first: device (d, f) then holds a piece of the parameter piece it holds under
    # FSDP, so the update needs no data from other devices before its all-gather.
    spec = array_spec(shape, mesh_shape, ("fsdp", "data"))
    if spec != P():
      return spec
  return array_spec(shape, mesh_shape, ("fsdp",))


def layout_shardings(mesh: Mesh, abstract_params: Any, abstract_opt: Any,
                     zero1: bool = False) -> tuple[Any, Any]:
  """(param_shardings, opt_shardings): NamedShardings for the pytrees of parameters and of
  optimizer state (arrays or ShapeDtypeStructs) under this mesh and layout."""
  return param_shardings(mesh, abstract_params), opt_shardings(mesh, abstract_opt, zero1)


def param_shardings(mesh: Mesh, abstract_params: Any) -> Any:
  """Parameters: sharded over `fsdp`, replicated over `data`."""
  shape = dict(mesh.shape)
  return jax.tree.map(
      lambda a: NamedSharding(mesh, array_spec(tuple(a.shape), shape, ("fsdp",))),
      abstract_params)


def opt_shardings(mesh: Mesh, abstract_opt: Any, zero1: bool = False) -> Any:
  """Optimizer state: like the parameters, and with ZeRO-1 also sharded over `data`."""
  shape = dict(mesh.shape)
  return jax.tree.map(
      lambda a: NamedSharding(mesh, _opt_spec(tuple(a.shape), shape, zero1)), abstract_opt)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's batch rows -> global arrays split over the batch axes."""
  out = {}
  for key, value in batch.items():
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """{device: bytes of `tree`'s arrays resident on it} over this process's devices."""
  held: dict[Any, int] = {}
  for a in jax.tree.leaves(tree):
    for shard in a.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held
