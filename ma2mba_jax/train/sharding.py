"""Device mesh and sharding rules, in one place.

Mesh axes: `data`, `fsdp` and `seq`; the batch's rows are split over `data` x `fsdp`, and
each row's tokens over `seq` (sequence parallel: train/sequence.py; with seq=1 nothing
changes). Three layouts of parameters and optimizer state, picked by `config.mesh` (see
`layout_shardings`), parameters replicated over `seq`:

  data parallel   fsdp=1, zero1=False   parameters and optimizer state replicated
  ZeRO-1          zero1=True            parameters replicated over `data` (sharded over
                                        `fsdp` if fsdp > 1), optimizer state sharded over
                                        `data` x `fsdp` (x `seq`)
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
# Splits each row's tokens (and its frames) over devices.
SEQ_AXIS = "seq"
MESH_AXES = BATCH_AXES + (SEQ_AXIS,)
# Batch entries [B, T] split along T over `seq`, and the value that pads T to a multiple of
# its size (padding is segment 0: no loss, after every real token; see shard_batch).
TOKEN_KEYS = {"tokens": 0, "loss_mask": False, "vision_index": -1, "segment_ids": 0}
# Batch entries [B, F, ...] split along F over `seq` when F divides evenly.
FRAME_KEYS = ("frames", "frame_mask")
# Arrays with fewer elements stay replicated: sharding them saves little and costs a
# collective each.
MIN_SHARD_SIZE = 2**14


def make_mesh(mesh_cfg: Any, devices=None) -> Mesh:
  """Mesh (data, fsdp, seq) over `devices` (default: all); one of data, fsdp may be -1 (the
  devices left over). `seq` is innermost: a sequence's pieces sit on neighbouring devices."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  seq = int(mesh_cfg.get("seq", 1)) if hasattr(mesh_cfg, "get") else 1
  if seq < 1 or n % seq:
    raise ValueError(f"config.mesh.seq={seq} must be >= 1 and divide the {n} devices")
  fsdp = mesh_cfg.fsdp if mesh_cfg.fsdp != -1 else None
  data = mesh_cfg.data if mesh_cfg.data != -1 else None
  if fsdp is None and data is None:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  if fsdp is None:
    fsdp = n // (data * seq)
  if data is None:
    data = n // (fsdp * seq)
  if data * fsdp * seq != n:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} x seq={seq} must equal the {n} "
                     f"devices")
  # Each process feeds whole rows (shard_batch): a sample's pieces must share a host.
  if devices == list(jax.devices()) and jax.local_device_count() % seq:
    raise ValueError(f"config.mesh.seq={seq} must divide the {jax.local_device_count()} "
                     f"devices of each host (a sample's pieces stay on one host)")
  return Mesh(np.array(devices).reshape(data, fsdp, seq), MESH_AXES)


def seq_size(mesh: Mesh | None) -> int:
  """Devices a sequence is split over (1 without a mesh or a `seq` axis)."""
  return 1 if mesh is None else dict(mesh.shape).get(SEQ_AXIS, 1)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch's rows are split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


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
    # FSDP, so the update needs no data from other devices before its all-gather. The
    # devices of a sample's pieces (`seq`) hold the same parameters and gradients: they
    # split the optimizer state too.
    spec = array_spec(shape, mesh_shape, ("fsdp", "data", SEQ_AXIS))
    if spec != P():
      return spec
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


def batch_sharding(mesh: Mesh, ndim: int, split_axis1: bool = False) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; with split_axis1 the next axis (tokens or
  frames) over `seq`."""
  rest = [None] * (ndim - 1)
  if split_axis1 and seq_size(mesh) > 1:
    rest[0] = SEQ_AXIS
  return NamedSharding(mesh, P(BATCH_AXES, *rest))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def pad_tokens(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """The batch with its token axis padded to a multiple of `multiple` (as padding: segment
  0, no loss, no vision; after every real token, so no real output changes)."""
  seqlen = batch["tokens"].shape[1]
  pad = -seqlen % multiple
  if not pad:
    return batch
  out = dict(batch)
  for key, value in TOKEN_KEYS.items():
    if key in out:
      widths = [(0, 0)] * out[key].ndim
      widths[1] = (0, pad)
      out[key] = np.pad(out[key], widths, constant_values=value)
  return out


def shard_batch(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's batch rows -> global arrays split over the batch axes; with a `seq`
  axis, tokens (padded to a multiple of it) split over `seq`, and frames too when their
  number divides evenly (else each of a row's devices holds all its frames)."""
  n_seq = seq_size(mesh)
  if n_seq > 1:
    batch = pad_tokens(batch, n_seq)
  out = {}
  for key, value in batch.items():
    split = n_seq > 1 and (key in TOKEN_KEYS or (key in FRAME_KEYS and value.ndim > 1
                                                 and value.shape[1] % n_seq == 0))
    sharding = batch_sharding(mesh, value.ndim, split_axis1=split)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """{device: bytes of `tree`'s arrays resident on it} over this process's devices."""
  held: dict[Any, int] = {}
  for a in jax.tree.leaves(tree):
    for shard in a.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held
