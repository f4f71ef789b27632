"""The typed batch: what the data pipeline hands to the model, the trainer and the benchmarks.

The contract (dtypes, shapes, padding, packing) is written once, in docs/data_formats.md,
"The batch contract"; the fields below name it. A `Batch` is a pytree (jax.tree.map, jit,
shard_map and device_put see its arrays; absent optional fields are None, no leaves), so
the same value holds numpy rows on the host and sharded arrays on the devices.

Letters: B rows, T tokens per row, F frames per row, S frame side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct

Array = Any  # a numpy or jax array


@flax.struct.dataclass
class Batch:
  """Rows of the pipeline's batches (docs/data_formats.md, "The batch contract")."""
  tokens: Array                    # int32 [B, T]: ids; padding holds <|endoftext|>
  loss_mask: Array                 # bool [B, T]: the next token is a target
  vision_index: Array              # int32 [B, T]: into the row's vision tokens [F*K]; -1: text
  segment_ids: Array               # int32 [B, T]: 1, 2, ... per example in a row; 0: padding
  frames: Array | None = None      # uint8 [B, F, S, S, 3]: the row's frames, then zeros
  frame_mask: Array | None = None  # bool [B, F]: real frames (they come first)
  # Derived from the fields above by the train and eval steps (train/step.py), on whole rows:
  targets: Array | None = None     # int32 [B, T]: the next token
  weights: Array | None = None     # f32 [B, T]: 1 where the loss counts (never across segments)
  reset: Array | None = None       # bool [B, T]: a packed segment starts (packing only)

  @classmethod
  def from_dict(cls, rows: Mapping[str, Array]) -> Batch:
    """From the pipeline's dict of arrays (data/pipeline.py); names a missing or unknown key."""
    names = set(cls.__dataclass_fields__)
    required = {"tokens", "loss_mask", "vision_index", "segment_ids"}
    missing, unknown = required - set(rows), set(rows) - names
    if missing or unknown:
      raise KeyError(f"Batch.from_dict: missing keys {sorted(missing)}, unknown keys "
                     f"{sorted(unknown)} (the batch contract: docs/data_formats.md)")
    return cls(**rows)

  def as_dict(self) -> dict[str, Array]:
    """{field: array} of the fields that are set."""
    return {name: getattr(self, name) for name in self.__dataclass_fields__
            if getattr(self, name) is not None}


def as_batch(batch: Batch | Mapping[str, Array]) -> Batch:
  """`batch` itself, or the pipeline's dict of arrays as a Batch (Batch.from_dict)."""
  return batch if isinstance(batch, Batch) else Batch.from_dict(batch)
