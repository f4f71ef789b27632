"""The vision encoder: a ViT in the CLIP vision layout (and SigLIP's), as an NNX module.

images [B, S, S, 3] -> normalise -> patch embedding (a stride-P convolution) -> [class token]
+ learned position embeddings -> [pre-LayerNorm] -> L pre-norm encoder layers -> features.

Features are the hidden states after `n_layers + feature_layer + 1` layers (HF's
`hidden_states[feature_layer]`; LLaVA's `select_layer`), class token dropped: with the default
`feature_layer=-2`, the output of the penultimate layer, [B, G*G, D] ([B, 576, 1024] for
CLIP ViT-L/14-336). The layers after it and the post-LayerNorm are kept as parameters (so
that a checkpoint round-trips and parameter counts match the published ones) but are never
run: they live apart, in `unused_layers` and `post_norm`, so that the layers that run are one
stack, scanned without slicing (a slice of stacked parameters would be a copy).

The encoder layers are stacked on a leading axis L (built with `nnx.vmap`) and run with
`jax.lax.scan`, each layer under `jax.checkpoint` when `remat=True`: compile time does not grow
with depth and, under remat, only each layer's input [B, T, D] is kept for the backward pass.
Matrix products run in the compute `dtype`; LayerNorms, softmax and the residual stream stay
in float32.

Pixel contract: uint8 frames hold [0, 255] and are divided by 255; floating frames must
already be in [0, 1] (as the CLIP processor's `rescale` produces). Either way the model then
applies the config's per-channel mean/std (CLIP's or SigLIP's), so callers pass raw frames.

Axis legend: B images, S image side, P patch side, G patch grid side (floor(S / P)), K patches
(G*G), T tokens in the encoder (K, or K + 1 with a class token), D width, H heads, E head
dim (D // H), M MLP width, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def quick_gelu(x: Array) -> Array:
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# Name (as in HF's `hidden_act`, plus short aliases) -> activation.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Architecture of the vision encoder (hyperparameters only, no training switches)."""
  # Preset name, for logs.
  name: str
  # Input side S in pixels (square images).
  image_size: int
  # Patch side P. Pixels past the last whole patch are ignored (SigLIP-384: 27 patches of
  # 14 cover 378 of 384), as in a VALID stride-P convolution.
  patch_size: int
  # Residual width D.
  width: int
  # Encoder layers L in the checkpoint (features may come from an earlier one).
  n_layers: int
  # Attention heads H; D must be a multiple of it.
  n_heads: int
  # MLP hidden width M.
  mlp_dim: int
  # MLP activation: a key of ACTIVATIONS.
  activation: str = "quick_gelu"
  # Prepend a learned class token (CLIP yes, SigLIP no).
  class_token: bool = True
  # LayerNorm after the embeddings (CLIP's `pre_layrnorm`; SigLIP has none).
  pre_norm: bool = True
  # Bias in the patch-embedding convolution (CLIP no, SigLIP yes).
  patch_bias: bool = False
  # LayerNorm epsilon everywhere.
  norm_eps: float = 1e-5
  # Which hidden state is the feature, indexed as HF's `hidden_states` (0 = embeddings,
  # i = output of layer i, negative from the end): -2 = output of the penultimate layer.
  feature_layer: int = -2
  # Per-channel normalisation applied to [0, 1] pixels.
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD

  def __post_init__(self):
    if self.image_size < self.patch_size:
      raise ValueError(f"vision {self.name}: image_size {self.image_size} is smaller than "
                       f"patch_size {self.patch_size}")
    if self.width % self.n_heads:
      raise ValueError(f"vision {self.name}: width {self.width} is not a multiple of "
                       f"n_heads {self.n_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"vision {self.name}: unknown activation {self.activation!r}; "
                       f"valid: {sorted(ACTIVATIONS)}")
    if not -(self.n_layers + 1) <= self.feature_layer <= self.n_layers:
      raise ValueError(f"vision {self.name}: feature_layer {self.feature_layer} outside "
                       f"[{-(self.n_layers + 1)}, {self.n_layers}]")

  @property
  def grid(self) -> int:
    """G: patches per image side."""
    return self.image_size // self.patch_size

  @property
  def n_patches(self) -> int:
    """K: patch tokens per image (the feature count per image)."""
    return self.grid * self.grid

  @property
  def n_positions(self) -> int:
    """T: tokens inside the encoder (patches plus the class token, if any)."""
    return self.n_patches + int(self.class_token)

  @property
  def head_dim(self) -> int:
    return self.width // self.n_heads

  @property
  def n_layers_run(self) -> int:
    """Encoder layers run to produce the features."""
    return self.feature_layer % (self.n_layers + 1)


VISION_PRESETS: dict[str, VisionConfig] = {
    # openai/clip-vit-large-patch14-336: the paper's encoder (303,507,456 parameters).
    "clip-l-336": VisionConfig(
        name="clip-l-336", image_size=336, patch_size=14, width=1024, n_layers=24, n_heads=16,
        mlp_dim=4096, activation="quick_gelu", class_token=True, pre_norm=True,
        patch_bias=False, norm_eps=1e-5),
    # google/siglip-so400m-patch14-384 (vision tower; its attention-pooling head is not
    # built): the encoder of the authors' follow-up work. 27 x 27 = 729 patches.
    "siglip-so400m-384": VisionConfig(
        name="siglip-so400m-384", image_size=384, patch_size=14, width=1152, n_layers=27,
        n_heads=16, mlp_dim=4304, activation="gelu_tanh", class_token=False, pre_norm=False,
        patch_bias=True, norm_eps=1e-6, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
    # For tests: 4 x 4 patches, CLIP layout.
    "tiny": VisionConfig(
        name="tiny", image_size=32, patch_size=8, width=32, n_layers=3, n_heads=4,
        mlp_dim=64, activation="quick_gelu", class_token=True, pre_norm=True,
        patch_bias=False, norm_eps=1e-5),
}


def vision_config(name: str, **overrides: Any) -> VisionConfig:
  """The preset `name` (optionally with fields replaced); unknown names list the valid ones."""
  if name not in VISION_PRESETS:
    raise ValueError(f"unknown vision preset {name!r}; valid: {sorted(VISION_PRESETS)}")
  return dataclasses.replace(VISION_PRESETS[name], **overrides)


def normalize_images(images: Array, mean: tuple[float, ...], std: tuple[float, ...]) -> Array:
  """uint8 [..., 3] in [0, 255] or float [..., 3] in [0, 1] -> float32 (x - mean) / std."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    pixels = images.astype(jnp.float32) / 255.0
  else:
    pixels = images.astype(jnp.float32)
  return (pixels - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: the fast E[x^2] - E[x]^2 loses precision on CLIP's large
  # late-layer activations.
  return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, param_dtype=jnp.float32,
                       rngs=rngs)


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, config: VisionConfig, *, dtype: Any, rngs: nnx.Rngs,
               implementation: str | None = None):
    d = config.width
    self.n_heads = config.n_heads
    # jax.nn.dot_product_attention's backend: None (JAX picks), "xla" or "cudnn" (fused
    # flash attention; GPU, bf16/fp16 inputs only).
    self.implementation = implementation
    linear = lambda: nnx.Linear(d, d, use_bias=True, dtype=dtype, rngs=rngs)
    self.q, self.k, self.v, self.out = linear(), linear(), linear(), linear()

  def __call__(self, x: Array) -> Array:
    """x [B, T, D] -> [B, T, D] (compute dtype)."""
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.n_heads, d // self.n_heads)  # [B, T, H, E]
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    # The XLA path takes the softmax in float32 whatever the input dtype.
    y = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)  # [B,T,H,E]
    return self.out(y.reshape(b, t, d))


class MLP(nnx.Module):
  """fc1 -> activation -> fc2."""

  def __init__(self, config: VisionConfig, *, dtype: Any, rngs: nnx.Rngs):
    self.activation = config.activation
    self.fc1 = nnx.Linear(config.width, config.mlp_dim, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(config.mlp_dim, config.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x [B, T, D] -> [B, T, D]."""
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-norm transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, config: VisionConfig, *, dtype: Any, rngs: nnx.Rngs,
               attention_impl: str | None = None):
    self.norm1 = _layer_norm(config.width, config.norm_eps, rngs)
    self.attn = Attention(config, dtype=dtype, rngs=rngs, implementation=attention_impl)
    self.norm2 = _layer_norm(config.width, config.norm_eps, rngs)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x [B, T, D] float32 -> [B, T, D] float32 (the residual stream stays float32)."""
    x = x + self.attn(self.norm1(x)).astype(jnp.float32)
    return x + self.mlp(self.norm2(x)).astype(jnp.float32)


def _layer_stack(config: VisionConfig, n: int, dtype: Any, rngs: nnx.Rngs,
                 attention_impl: str | None = None) -> EncoderLayer | None:
  """n EncoderLayers as one module whose parameters have a leading [n] axis (None if n = 0)."""
  if n == 0:
    return None

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(layer_rngs: nnx.Rngs) -> EncoderLayer:
    return EncoderLayer(config, dtype=dtype, rngs=layer_rngs, attention_impl=attention_impl)

  return make(rngs)


class VisionEncoder(nnx.Module):
  """The ViT. State paths: patch_embed/{kernel[,bias]}, [class_embed], pos_embed,
  [pre_norm/{scale,bias}], layers/{norm1,attn/{q,k,v,out},norm2,mlp/{fc1,fc2}}/... (the
  `n_layers_run` layers that produce the features, leading axis L on every parameter),
  [unused_layers/...] (the rest, same layout), post_norm/{scale,bias}."""

  def __init__(self, config: VisionConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs,
               attention_impl: str | None = None):
    self.config = config
    d = config.width
    self.patch_embed = nnx.Conv(3, d, kernel_size=(config.patch_size, config.patch_size),
                                strides=(config.patch_size, config.patch_size), padding="VALID",
                                use_bias=config.patch_bias, dtype=dtype, rngs=rngs)
    init = nnx.initializers.normal(stddev=d ** -0.5)
    if config.class_token:
      self.class_embed = nnx.Param(init(rngs.params(), (d,), jnp.float32))
    self.pos_embed = nnx.Param(init(rngs.params(), (config.n_positions, d), jnp.float32))
    if config.pre_norm:
      self.pre_norm = _layer_norm(d, config.norm_eps, rngs)
    n_run = config.n_layers_run
    self.layers = _layer_stack(config, n_run, dtype, rngs, attention_impl)
    # Part of the checkpoint, never run for features (see the module docstring).
    self.unused_layers = _layer_stack(config, config.n_layers - n_run, dtype, rngs)
    self.post_norm = _layer_norm(d, config.norm_eps, rngs)

  def embed(self, images: Array) -> Array:
    """images [B, S, S, 3] uint8 or float -> encoder input [B, T, D] float32."""
    cfg = self.config
    if images.shape[-3:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"vision {cfg.name} expects images [..., {cfg.image_size}, "
                       f"{cfg.image_size}, 3], got {images.shape}")
    pixels = normalize_images(images, cfg.image_mean, cfg.image_std)
    patches = self.patch_embed(pixels).astype(jnp.float32)  # [B, G, G, D]
    b = patches.shape[0]
    x = patches.reshape(b, cfg.n_patches, cfg.width)  # [B, K, D], row-major over the grid
    if cfg.class_token:
      cls = jnp.broadcast_to(self.class_embed[...], (b, 1, cfg.width))
      x = jnp.concatenate([cls, x], axis=1)  # [B, T, D]
    x = x + self.pos_embed[...]
    if cfg.pre_norm:
      x = self.pre_norm(x)
    return x

  def run_layers(self, x: Array, *, remat: bool = False) -> Array:
    """x [B, T, D] float32 through `layers` (a scan, optionally remat per layer) -> [B, T, D]."""
    if self.layers is None:
      return x
    graphdef, stacked = nnx.split(self.layers)

    def step(h: Array, layer_state) -> tuple[Array, None]:
      return nnx.merge(graphdef, layer_state)(h), None

    if remat:
      step = jax.checkpoint(step, prevent_cse=False)  # CSE cannot undo remat inside a scan
    x, _ = jax.lax.scan(step, x, stacked)
    return x

  def __call__(self, images: Array, *, remat: bool = False) -> Array:
    """images [B, S, S, 3] -> features [B, K, D] float32 (hidden state `feature_layer`,
    class token dropped; patches in row-major grid order)."""
    cfg = self.config
    x = self.run_layers(self.embed(images), remat=remat)
    return x[:, int(cfg.class_token):]
