"""Device mesh and sharding rules, in one place.

Mesh axes: `data` (batch split, parameters replicated) and `fsdp` (batch split too, and
parameters and optimizer state sharded on their largest divisible axis). With one device
both axes have size 1 and everything is replicated. Multi-host: call
`jax.distributed.initialize()` before building the mesh (main.py does when asked).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


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


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
  """Shards the largest axis divisible by the fsdp size; small arrays stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(tuple(a.shape), fsdp)),
                      abstract_tree)


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
