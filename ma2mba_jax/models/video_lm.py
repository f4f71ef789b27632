"""Video-Ma²mba: vision encoder -> 2D pooling -> MLP projector, interleaved with text, then
the Mamba-2 LM.

Its inputs are the batch the data pipeline makes (`data.batch.Batch` in the train steps),
whose contract (keys, dtypes, shapes, padding, packing) is written once, in
docs/data_formats.md ("The batch contract"): this model reads tokens, vision_index,
frames and frame_mask, and restarts its state where a packed row's segment_ids change
(`reset`).

Each frame becomes K = ceil(G / pool)^2 tokens (144 for CLIP-L-336 with 2 x 2 pooling). The
input embedding at position t is the LM's token embedding where vision_index < 0, and vision
token vision_index[b, t] of row b otherwise.

Frames are encoded `frames_per_microbatch` at a time in a `jax.lax.scan` whose body is under
`jax.checkpoint`: the backward pass keeps only each micro-batch's input frames (uint8) and
recomputes its encoder forward, so encoder activation memory is that of one micro-batch
whatever the video length; only the outputs [B, F*K, C] grow with it. Micro-batches holding
no real frame (padding) are skipped with `lax.cond`. Inside the encoder, layers are
additionally checkpointed one by one when `remat_vision` is on.

State paths begin with 'vision' (VisionEncoder), 'projector' (Projector) and 'llm'
(Mamba2LM), so a trainer can freeze or give learning rates per group by path.

Axis legend: B batch, T tokens, F frames per row, S image side, M frames per micro-batch,
U micro-batches, K vision tokens per frame, N patches per frame, D vision width, C LLM width,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ma2mba_jax.models.mamba2 import Mamba2Config, Mamba2LM
from ma2mba_jax.models.presets import mamba2_config
from ma2mba_jax.models.projector import Projector, pooled_side
from ma2mba_jax.models.vision import VisionConfig, VisionEncoder, vision_config

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  """The video LMM: which encoder and LM, how frames are pooled and encoded."""
  # Preset name, for logs.
  name: str
  # Vision preset (models/vision.py): clip-l-336 | siglip-so400m-384 | tiny.
  vision: str
  # Mamba-2 preset (models/presets.py): 130m | 370m | 780m | 1.3b | 2.7b | tiny.
  llm: str
  # Pooling factor per grid side: 2 turns 24 x 24 patches into 12 x 12 tokens.
  pool_factor: int = 2
  # Hidden width of the projector MLP (None: the LLM width, as LLaVA's mlp2x_gelu).
  projector_hidden: int | None = None
  # Frames encoded together; encoder activation memory scales with this, not with F.
  frames_per_microbatch: int = 16
  # Checkpoint every encoder layer (besides the per-micro-batch checkpoint).
  remat_vision: bool = True
  # Dtype of matrix-product inputs in the encoder, projector and LM: float32 | bfloat16.
  compute_dtype: str = "float32"
  # SSD backend of the LM: auto | xla | pallas | triton.
  ssd_impl: str = "auto"
  # LM vocabulary size (None: the LM preset's), e.g. a small tokenizer's for the tiny model.
  llm_vocab_size: int | None = None
  # The encoder's attention (jax.nn.dot_product_attention implementation): None (JAX
  # picks; XLA on CPU), "xla", or "cudnn" (fused flash attention: GPU, bfloat16 only).
  vision_attention: str | None = None

  def __post_init__(self):
    if self.frames_per_microbatch < 1:
      raise ValueError(f"video {self.name}: frames_per_microbatch must be >= 1, got "
                       f"{self.frames_per_microbatch}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"video {self.name}: compute_dtype must be 'float32' or 'bfloat16', "
                       f"got {self.compute_dtype!r}")
    if self.vision_attention not in (None, "xla", "cudnn"):
      raise ValueError(f"video {self.name}: vision_attention must be None, 'xla' or 'cudnn', "
                       f"got {self.vision_attention!r}")
    if self.vision_attention == "cudnn" and self.compute_dtype != "bfloat16":
      raise ValueError(f"video {self.name}: vision_attention='cudnn' needs compute_dtype "
                       f"'bfloat16', got {self.compute_dtype!r}")
    pooled_side(self.vision_config.grid, self.pool_factor)  # validates the factor
    self.llm_config  # validates the LM preset name

  @property
  def vision_config(self) -> VisionConfig:
    return vision_config(self.vision)

  @property
  def llm_config(self) -> Mamba2Config:
    overrides = {} if self.llm_vocab_size is None else {"vocab_size": self.llm_vocab_size}
    return mamba2_config(self.llm, compute_dtype=self.compute_dtype, ssd_impl=self.ssd_impl,
                         **overrides)

  @property
  def tokens_per_frame(self) -> int:
    """K: LM tokens per frame after pooling (the data pipeline's `tokens_per_frame`)."""
    return pooled_side(self.vision_config.grid, self.pool_factor) ** 2

  @property
  def image_size(self) -> int:
    """S: the frame side the encoder expects (the data pipeline's `image_size`)."""
    return self.vision_config.image_size


def fast_vision_attention(config: VideoConfig) -> str | None:
  """The encoder attention to run `config`'s model with on this backend: cuDNN's fused flash
  attention on a GPU in bfloat16 (1.6x the encoder's frames/s of XLA's attention at M=32,
  CLIP-L/336 on an H100, BENCHMARKS.md), else `config.vision_attention`."""
  head_dim = config.vision_config.head_dim
  if (jax.default_backend() == "gpu" and config.compute_dtype == "bfloat16"
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return config.vision_attention


def with_vision_attention(model: VideoMa2mba, attention: str | None) -> VideoMa2mba:
  """The same parameters (not copied) in a model whose encoder runs `attention`."""
  if attention == model.config.vision_attention:
    return model
  config = dataclasses.replace(model.config, vision_attention=attention)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VideoMa2mba(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


class VideoMa2mba(nnx.Module):
  """Frames + tokens -> logits. Attributes `vision`, `projector`, `llm` are the three
  parameter groups."""

  def __init__(self, config: VideoConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.compute_dtype)
    vcfg, lcfg = config.vision_config, config.llm_config
    self.vision = VisionEncoder(vcfg, dtype=dtype, rngs=rngs,
                                attention_impl=config.vision_attention)
    self.projector = Projector(vcfg.width, lcfg.d_model, hidden_width=config.projector_hidden,
                               pool_factor=config.pool_factor, dtype=dtype, rngs=rngs)
    self.llm = Mamba2LM(lcfg, rngs=rngs)

  def encode_images(self, images: Array) -> Array:
    """images [M, S, S, 3] -> LM tokens [M, K, C] float32, in one go (no micro-batching)."""
    features = self.vision(images, remat=self.config.remat_vision)  # [M, N, D]
    return self.projector(features)  # [M, K, C]

  def encode_frames(self, frames: Array, frame_mask: Array | None = None) -> Array:
    """frames [B, F, S, S, 3] (+ frame_mask bool [B, F]) -> vision tokens [B, F*K, C] f32.

    Frame f's tokens are rows f*K ... f*K + K-1. Masked frames give zero tokens.
    """
    b, f = frames.shape[:2]
    k, c = self.config.tokens_per_frame, self.llm.config.d_model
    n = b * f
    if n == 0:
      return jnp.zeros((b, 0, c), jnp.float32)
    m = min(self.config.frames_per_microbatch, n)
    pad = -n % m
    mask = jnp.ones((b, f), bool) if frame_mask is None else frame_mask.astype(bool)
    images = frames.reshape(n, *frames.shape[2:])  # [B*F, S, S, 3]
    mask = mask.reshape(n)
    if pad:  # whole micro-batches; the padding frames are masked
      images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
      mask = jnp.pad(mask, (0, pad))
    images = images.reshape(-1, m, *images.shape[1:])  # [U, M, S, S, 3]
    mask = mask.reshape(-1, m)  # [U, M]

    graphdef, params = nnx.split((self.vision, self.projector))

    def encode(params, images: Array, mask: Array) -> Array:
      """One micro-batch: [M, S, S, 3] -> [M, K, C]; skipped if it has no real frame."""
      vision, projector = nnx.merge(graphdef, params)

      def run(images):
        tokens = projector(vision(images, remat=self.config.remat_vision))
        return jnp.where(mask[:, None, None], tokens, 0.0)

      skip = lambda images: jnp.zeros((m, k, c), jnp.float32)
      return jax.lax.cond(jnp.any(mask), run, skip, images)

    # Backward keeps each micro-batch's input frames, never its activations.
    encode = jax.checkpoint(encode, prevent_cse=False)

    def step(carry, xs):
      return carry, encode(params, *xs)

    _, tokens = jax.lax.scan(step, None, (images, mask))  # [U, M, K, C]
    return tokens.reshape(-1, k, c)[:n].reshape(b, f * k, c)

  def embed_inputs(self, tokens: Array, vision_index: Array, frames: Array | None = None,
                   frame_mask: Array | None = None) -> Array:
    """tokens, vision_index int32 [B, T] (+ frames [B, F, S, S, 3], frame_mask [B, F]) ->
    input embeddings [B, T, C] float32: text embeddings with the vision tokens at the
    positions where vision_index >= 0. Without frames, vision_index must be all -1.

    vision_index values past F*K - 1 cannot be checked under jit; they are clipped to the
    last vision token (the data pipeline never produces them).
    """
    is_vision = vision_index >= 0  # [B, T]
    # Vision positions hold a placeholder id that need not be a trained row; look up row 0.
    text = self.llm.embed(jnp.where(is_vision, 0, tokens))  # [B, T, C]
    if frames is None:
      return text
    vis = self.encode_frames(frames, frame_mask)  # [B, F*K, C]
    if vis.shape[1] == 0:
      return text
    index = jnp.clip(vision_index, 0, vis.shape[1] - 1)[..., None]  # [B, T, 1]
    gathered = jnp.take_along_axis(vis, index, axis=1)  # [B, T, C]
    return jnp.where(is_vision[..., None], gathered, text)

  def __call__(self, tokens: Array, vision_index: Array, frames: Array | None = None,
               frame_mask: Array | None = None, *, states: Any = None,
               return_states: bool = False, reset: Array | None = None):
    """-> logits [B, T, V] float32 (and the LM's final states if return_states).

    states: the LM's LayerStates before the first token (None: a fresh sequence), so a long
    conversation can be run piece by piece.
    reset: [B, T] bool, optional, for packed rows: True where an example starts
    (`kernels.ssd.reset_from_segment_ids(segment_ids)`); the LM restarts its state there.
    (Frames are encoded one by one, so they need no reset.)
    """
    embeds = self.embed_inputs(tokens, vision_index, frames, frame_mask)
    return self.llm(embeds=embeds, states=states, return_states=return_states, reset=reset)
