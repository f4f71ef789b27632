"""infer.checkpoint.cast_matrices: matrices in the asked dtype, vectors f32, also inside the
stacked layers (where a per-layer vector is [L, n])."""

import jax
import jax.numpy as jnp
from flax import nnx

from ma2mba_jax.infer.checkpoint import cast_matrices
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config


def test_matrices_cast_and_per_layer_vectors_stay_f32():
  state = jax.eval_shape(lambda: nnx.state(cast_matrices(
      VideoMa2mba(video_config("tiny"), rngs=nnx.Rngs(0)), jnp.bfloat16)))  # shapes only
  dtypes = {".".join(map(str, path)): v.dtype for path, v in nnx.to_flat_state(state)}
  for name in ("llm.layers.mixer.in_proj.kernel", "llm.layers.mixer.out_proj.kernel",
               "llm.embedding", "vision.layers.mlp.fc1.kernel", "projector.fc1.kernel",
               "vision.patch_embed.kernel", "vision.pos_embed"):
    assert dtypes[name] == jnp.bfloat16, name
  for name in ("llm.layers.mixer.A_log", "llm.layers.mixer.D", "llm.layers.mixer.dt_bias",
               "llm.layers.mixer.norm.weight", "llm.layers.norm.weight",
               "vision.layers.attn.q.bias", "vision.layers.norm1.scale",
               "llm.final_norm.weight", "projector.fc1.bias"):
    assert dtypes[name] == jnp.float32, name
