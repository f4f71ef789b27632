"""data.batch.Batch: built from the pipeline's dict, a pytree whose unset fields hold no
leaves, and it names what is missing or unknown."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.data.batch import Batch


def rows(b: int = 2, t: int = 6, f: int = 3, s: int = 4) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return dict(tokens=rng.integers(0, 50, (b, t)).astype(np.int32),
              loss_mask=rng.random((b, t)) < 0.5,
              vision_index=rng.integers(-1, f, (b, t)).astype(np.int32),
              segment_ids=rng.integers(0, 3, (b, t)).astype(np.int32),
              frames=rng.integers(0, 255, (b, f, s, s, 3)).astype(np.uint8),
              frame_mask=rng.random((b, f)) < 0.5)


def test_from_dict_and_back():
  d = rows()
  batch = Batch.from_dict(d)
  assert batch.targets is None and batch.reset is None
  back = batch.as_dict()
  assert set(back) == set(d)
  for k in d:
    assert back[k] is d[k]


def test_a_pytree_whose_unset_fields_hold_no_leaves():
  batch = Batch.from_dict({k: v for k, v in rows().items() if not k.startswith("frame")})
  assert len(jax.tree.leaves(batch)) == 4
  doubled = jax.jit(lambda b: jax.tree.map(lambda a: a * 2, b))(batch)
  assert isinstance(doubled, Batch) and doubled.frames is None
  np.testing.assert_array_equal(doubled.tokens, 2 * batch.tokens)
  with_targets = batch.replace(targets=jnp.asarray(batch.tokens))
  assert len(jax.tree.leaves(with_targets)) == 5


def test_missing_and_unknown_keys_are_named():
  d = rows()
  del d["segment_ids"]
  d["tokenz"] = d["tokens"]
  with pytest.raises(KeyError, match=r"missing keys \['segment_ids'\], unknown keys "
                                     r"\['tokenz'\]"):
    Batch.from_dict(d)
