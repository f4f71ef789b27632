"""The Mamba-2 language model in Flax NNX: full, chunked and recurrent modes.

One model, three ways to run it, all computing the same function:

  * full:      `model(tokens)` -> logits, states start at zero;
  * chunked:   `model(tokens, states=s, return_states=True)` -> (logits, states): every
               layer's conv and SSM state is passed in and returned, so a sequence cut into
               pieces of any length gives the same logits and gradients as the whole;
  * recurrent: `model.step(token, cache)` -> (logits, cache): one token, constant memory.

The layers are ONE `Mamba2Block` whose parameters carry a leading layer axis L, so the layer
loop is a `jax.lax.scan` over `block_apply` (the pure one-layer function that the MA-GC
code in `ma2mba_jax.remat` scans and checkpoints).

Precision: parameters are float32 (`param_dtype`); matmul, conv and SSD inputs are cast to
`compute_dtype` (float32 or bfloat16); norms, the residual stream, the states and the logits
stay float32.

Activations inside a block are tagged with `jax.ad_checkpoint.checkpoint_name` (names in
`ACTIVATION_NAMES`), so remat policies such as `save_only_these_names` can keep the matmul
outputs of a cell; outside jax.checkpoint the tags do nothing. With `block_impl="fused"` (the
default: one custom_vjp per block, models/fused_block.py) a policy can keep only
`mamba2_in_proj` and `mamba2_out_proj`: that backward recomputes the conv and SSD outputs.

Axis letters: B batch, T time, D model width, E inner width (d_inner = expand * D),
H heads, P head dim, N state size, G groups, K conv kernel, L layers, V (padded) vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ma2mba_jax.kernels.ssd import process_dt
from ma2mba_jax.kernels.ssd import sequence_parallel as seq_par

Array = jax.Array
f32 = jnp.float32
# The dtypes Mamba2Config.compute_dtype accepts (matmul / conv / SSD inputs).
COMPUTE_DTYPES = ("float32", "bfloat16")
# The values Mamba2Config.block_impl accepts.
BLOCK_IMPLS = ("fused", "autodiff")

# Named activations of a block (sequence mode): in_proj output [B, T, 2E+2GN+H], conv output
# [B, T, C], SSD output [B, T, H, P], out_proj output [B, T, D].
ACTIVATION_NAMES = ("mamba2_in_proj", "mamba2_conv", "mamba2_ssd", "mamba2_out_proj")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Hyperparameters of a Mamba-2 LM (defaults are mamba_ssm's Mamba2 defaults)."""

  # Model width D.
  d_model: int
  # Number of Mamba-2 blocks L.
  n_layers: int
  # Tokenizer vocabulary; the embedding has `padded_vocab_size` rows.
  vocab_size: int
  # The embedding rows are padded to a multiple of this (16 in the released Mamba-2 models).
  pad_vocab_to_multiple: int = 16
  # SSM state size N.
  d_state: int = 128
  # Head dim P.
  head_dim: int = 64
  # Inner width E = expand * D.
  expand: int = 2
  # Groups G sharing B and C (G divides H).
  n_groups: int = 1
  # Causal depthwise conv kernel K.
  d_conv: int = 4
  # SSD chunk length Q (any sequence length is accepted).
  chunk_len: int = 256
  # Initial step sizes are log-uniform in [dt_min, dt_max], floored at dt_init_floor.
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  # A = -exp(A_log) is initialised uniformly in -A_init_range.
  A_init_range: tuple[float, float] = (1.0, 16.0)
  # Step sizes are clipped to this range after softplus.
  dt_limit: tuple[float, float] = (0.0, math.inf)
  # Epsilon of every RMSNorm (block, gated and final).
  norm_eps: float = 1e-5
  # Logits from the embedding matrix (True) or from a separate lm_head.
  tie_embeddings: bool = True
  # Dtype of the parameters.
  param_dtype: Any = jnp.float32
  # Dtype of matmul / conv / SSD inputs: float32 or bfloat16.
  compute_dtype: Any = jnp.float32
  # SSD backend: auto | xla | pallas | triton (see kernels/ssd/registry.py).
  ssd_impl: str = "auto"
  # How a block's sequence-mode backward is made (BLOCK_IMPLS): "fused" is one custom_vjp
  # that keeps h and the in_proj output and recomputes the rest (models/fused_block.py);
  # "autodiff" is JAX's autodiff of the modules below. Same function, same parameters.
  block_impl: str = "fused"

  def __post_init__(self):
    # Normalise dtypes ("bfloat16", jnp.bfloat16 -> np.dtype) so configs compare and hash
    # the same however they were written.
    for name in ("param_dtype", "compute_dtype"):
      object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
    object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
    object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))
    self._validate()

  def _validate(self) -> None:
    positive = ("d_model", "n_layers", "vocab_size", "pad_vocab_to_multiple", "d_state",
                "head_dim", "expand", "n_groups", "d_conv", "chunk_len")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
    if self.d_inner % self.head_dim:
      raise ValueError(f"Mamba2Config: d_inner = expand * d_model = {self.d_inner} must be a "
                       f"multiple of head_dim = {self.head_dim}")
    if self.n_heads % self.n_groups:
      raise ValueError(f"Mamba2Config: n_groups = {self.n_groups} must divide the number of "
                       f"heads {self.n_heads}")
    if self.compute_dtype not in tuple(map(jnp.dtype, COMPUTE_DTYPES)):
      raise ValueError(f"Mamba2Config.compute_dtype must be float32 or bfloat16, got "
                       f"{self.compute_dtype}")
    if self.block_impl not in BLOCK_IMPLS:
      raise ValueError(f"Mamba2Config.block_impl must be one of {', '.join(BLOCK_IMPLS)}, got "
                       f"{self.block_impl!r}")
    lo, hi = self.dt_limit
    if not 0.0 <= lo <= hi:
      raise ValueError(f"Mamba2Config.dt_limit must be (lo, hi) with 0 <= lo <= hi, got "
                       f"{self.dt_limit}")
    if not 0.0 < self.dt_min <= self.dt_max:
      raise ValueError(f"Mamba2Config: need 0 < dt_min <= dt_max, got {self.dt_min}, "
                       f"{self.dt_max}")

  @property
  def d_inner(self) -> int:
    """E = expand * D."""
    return self.expand * self.d_model

  @property
  def n_heads(self) -> int:
    """H = E / P."""
    return self.d_inner // self.head_dim

  @property
  def conv_dim(self) -> int:
    """Channels of the conv over [x, B, C]: E + 2 G N."""
    return self.d_inner + 2 * self.n_groups * self.d_state

  @property
  def d_in_proj(self) -> int:
    """in_proj output width, [z, x, B, C, dt]: 2 E + 2 G N + H."""
    return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.n_heads

  @property
  def padded_vocab_size(self) -> int:
    """V: vocab_size rounded up to a multiple of pad_vocab_to_multiple."""
    m = self.pad_vocab_to_multiple
    return -(-self.vocab_size // m) * m

  def replace(self, **changes) -> Mamba2Config:
    return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- initialisers


def _torch_linear_init(fan_in: int, scale: float = 1.0):
  """PyTorch's default Linear / Conv init (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  bound = scale / math.sqrt(fan_in)

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def _dt_bias_init(config: Mamba2Config):
  """dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored."""
  def init(key, shape, dtype):
    lo, hi = math.log(config.dt_min), math.log(config.dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape, f32, minval=lo, maxval=hi))
    dt = jnp.maximum(dt, config.dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _A_log_init(config: Mamba2Config):
  """A_log = log(U[A_init_range]) so that A = -exp(A_log) is in -A_init_range."""
  def init(key, shape, dtype):
    lo, hi = config.A_init_range
    return jnp.log(jax.random.uniform(key, shape, f32, minval=lo, maxval=hi)).astype(dtype)
  return init


# --------------------------------------------------------------------------- layers


def rms_normalize(x: Array, eps: float) -> Array:
  """x [..., W] -> x / rms(x) over the last axis, in f32."""
  x = x.astype(f32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * weight over the last axis; computed and returned in f32."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))        # [W]

  def __call__(self, x: Array) -> Array:
    return rms_normalize(x, self.eps) * self.weight[...].astype(f32)


class GatedRMSNorm(nnx.Module):
  """Mamba-2's gated norm: RMSNorm(y * silu(z)) over groups of E/G channels, then * weight.

  (mamba_ssm's RMSNormGated with norm_before_gate=False and group_size = d_inner / G.)
  """

  def __init__(self, dim: int, n_groups: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.n_groups = n_groups
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))        # [E]

  def __call__(self, y: Array, z: Array) -> Array:
    """y, z: [..., E] -> [..., E] in f32."""
    return gated_rms_norm(y, z, self.weight[...], self.n_groups, self.eps)


def gated_rms_norm(y: Array, z: Array, weight: Array, n_groups: int, eps: float) -> Array:
  """`GatedRMSNorm` as a function: y, z [..., E], weight [E] -> [..., E] in f32."""
  gated = y.astype(f32) * jax.nn.silu(z.astype(f32))
  grouped = gated.reshape(gated.shape[:-1] + (n_groups, -1))     # [..., G, E/G]
  normed = rms_normalize(grouped, eps).reshape(gated.shape)
  return normed * weight.astype(f32)


class Linear(nnx.Module):
  """y = x @ kernel (no bias) with inputs cast to the compute dtype; y in compute dtype."""

  def __init__(self, d_in: int, d_out: int, *, compute_dtype: Any, param_dtype: Any,
               kernel_init, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (d_in, d_out), param_dtype))  # [I, O]

  def __call__(self, x: Array) -> Array:
    cd = self.compute_dtype
    return jnp.einsum("...i,io->...o", x.astype(cd), self.kernel[...].astype(cd),
                      preferred_element_type=f32).astype(cd)


def causal_conv(xBC: Array, conv_state: Array, weight: Array, bias: Array,
                reset: Array | None = None) -> tuple[Array, Array]:
  """Depthwise causal conv1d continuing from a state, then SiLU.

  Args:
    xBC: [B, T, C] inputs (C = conv_dim), any T >= 1.
    conv_state: [B, C, K-1] the K-1 inputs before xBC[:, 0] (zeros at the sequence start).
    weight: [K, C]; out[t] = bias + sum_k weight[k] * in[t - (K-1) + k] (PyTorch's conv1d
      cross-correlation with K-1 zeros of left padding).
    bias: [C].
    reset: [B, T] bool, optional (packed segments, True where a segment starts): token t
      uses input t-j only if there is no reset in (t-j, t] (the conv_state's inputs count
      as positions -(K-1) .. -1, so they reach only tokens before the first reset). None
      costs nothing.

  Returns:
    silu(out) [B, T, C] in xBC.dtype (accumulated in f32), and the new conv state
    [B, C, K-1] in f32: the last K-1 inputs of state + xBC. The state is read in xBC's
    dtype, which loses nothing when it holds earlier inputs of the same dtype. With
    `reset`, the inputs before the last reset are zeroed in it (no later token may reach
    them), so the state equals that of the last segment run alone and a caller that cuts
    T into blocks and slices `reset` the same way gets the unsplit result.
  """
  kernel = weight.shape[0]
  seqlen = xBC.shape[1]
  state = jnp.swapaxes(conv_state, 1, 2).astype(xBC.dtype)       # [B, K-1, C]

  def window(start: int, length: int) -> Array:
    """[state, xBC][:, start:start + length] (positions of the [B, K-1+T, C] window), built
    per tap: each tap's small concatenate fuses into the multiply-adds that read it, where
    one shared window would be written to memory whole first (a [B, K-1+T, C] copy)."""
    head = state[:, start:start + length]                        # from the state
    tail = xBC[:, max(start - (kernel - 1), 0):max(start + length - (kernel - 1), 0)]
    return tail if head.shape[1] == 0 else (
        head if tail.shape[1] == 0 else jnp.concatenate([head, tail], axis=1))

  if reset is None:
    taps = [window(k, seqlen) for k in range(kernel)]            # K x [B, T, C]
    last = window(seqlen, kernel - 1)                            # [B, K-1, C]
  else:
    window_all = window(0, kernel - 1 + seqlen)                  # [B, K-1+T, C]
    # Input p reaches token t iff no reset in (p, t] iff count[t] == count[p], where
    # count[p] = resets in [0, p] (0 for the state's positions p < 0).
    count = jnp.cumsum(reset.astype(jnp.int32), axis=1)          # [B, T]
    padded = jnp.pad(count, ((0, 0), (kernel - 1, 0)))           # [B, K-1+T]
    zero = jnp.zeros((), xBC.dtype)
    taps = [jnp.where((padded[:, k:k + seqlen] == count)[..., None],
                      window_all[:, k:k + seqlen], zero) for k in range(kernel)]
    keep = padded[:, seqlen:] == count[:, -1:]                   # [B, K-1]
    last = jnp.where(keep[..., None], window_all[:, seqlen:], zero)
  out = bias.astype(f32) + sum(taps[k].astype(f32) * weight[k].astype(f32)
                               for k in range(kernel))           # [B, T, C]
  new_state = jnp.swapaxes(last, 1, 2).astype(f32)               # [B, C, K-1]
  return jax.nn.silu(out).astype(xBC.dtype), new_state


def causal_conv_step(xBC: Array, conv_state: Array, weight: Array, bias: Array
                     ) -> tuple[Array, Array]:
  """One step of `causal_conv`: xBC [B, C] and conv_state [B, C, K-1] -> ([B, C], state)."""
  window = jnp.concatenate([conv_state.astype(xBC.dtype), xBC[:, :, None]],
                           axis=2).astype(f32)                   # [B, C, K]
  # The K products summed in order, as `causal_conv` does (an einsum here is a dot with a
  # batch axis, which XLA on GPU may run as a batched GEMM call per layer and token).
  out = bias.astype(f32) + sum(window[:, :, k] * weight[k].astype(f32)
                               for k in range(weight.shape[0]))  # [B, C]
  return jax.nn.silu(out).astype(xBC.dtype), window[:, :, 1:]


class Mamba2Mixer(nnx.Module):
  """The Mamba-2 mixer: in_proj -> conv + SiLU -> SSD (+ D skip) -> gated norm -> out_proj."""

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    cd, pd = c.compute_dtype, c.param_dtype
    self.in_proj = Linear(c.d_model, c.d_in_proj, compute_dtype=cd, param_dtype=pd,
                          kernel_init=_torch_linear_init(c.d_model), rngs=rngs)
    conv_init = _torch_linear_init(c.d_conv)  # depthwise: fan_in = K
    self.conv_weight = nnx.Param(conv_init(rngs.params(), (c.d_conv, c.conv_dim), pd))  # [K,C]
    self.conv_bias = nnx.Param(conv_init(rngs.params(), (c.conv_dim,), pd))            # [C]
    self.dt_bias = nnx.Param(_dt_bias_init(c)(rngs.params(), (c.n_heads,), pd))       # [H]
    self.A_log = nnx.Param(_A_log_init(c)(rngs.params(), (c.n_heads,), pd))           # [H]
    self.D = nnx.Param(jnp.ones((c.n_heads,), pd))                                    # [H]
    self.norm = GatedRMSNorm(c.d_inner, c.n_groups, eps=c.norm_eps, param_dtype=pd)
    # mamba_ssm rescales the residual branch's output projection by 1/sqrt(L).
    self.out_proj = Linear(c.d_inner, c.d_model, compute_dtype=cd, param_dtype=pd,
                           kernel_init=_torch_linear_init(c.d_inner, 1 / math.sqrt(c.n_layers)),
                           rngs=rngs)

  def _split_in_proj(self, u: Array, name: str | None = None) -> tuple[Array, Array, Array]:
    """u [..., D] -> z [..., E], xBC [..., C], dt [..., H] (raw), in compute dtype."""
    c = self.config
    zxbcdt = self.in_proj(u)
    if name is not None:
      zxbcdt = checkpoint_name(zxbcdt, name)
    z, xBC, dt = jnp.split(zxbcdt, [c.d_inner, c.d_inner + c.conv_dim], axis=-1)
    return z, xBC, dt

  def _split_xBC(self, xBC: Array) -> tuple[Array, Array, Array]:
    """xBC [..., C] -> x [..., H, P], B [..., G, N], C [..., G, N]."""
    c = self.config
    gn = c.n_groups * c.d_state
    x, B, C = jnp.split(xBC, [c.d_inner, c.d_inner + gn], axis=-1)
    lead = xBC.shape[:-1]
    return (x.reshape(lead + (c.n_heads, c.head_dim)),
            B.reshape(lead + (c.n_groups, c.d_state)),
            C.reshape(lead + (c.n_groups, c.d_state)))

  def _output(self, y: Array, z: Array) -> Array:
    """y [..., H, P], z [..., E] -> out_proj(gated_norm(y, z)) [..., D] in compute dtype."""
    y = y.reshape(z.shape)
    return self.out_proj(self.norm(y, z).astype(self.config.compute_dtype))

  def __call__(self, u: Array, conv_state: Array, ssm_state: Array,
               reset: Array | None = None) -> tuple[Array, Array, Array]:
    """Sequence mode (full or chunked), any T >= 1.

    Args:
      u: [B, T, D] normalised input (cast to the compute dtype).
      conv_state: [B, C, K-1] f32; ssm_state: [B, H, P, N] f32 (the states before u[:, 0]).
      reset: [B, T] bool, optional: True where a packed segment starts (the conv and SSD
        restart there; see `causal_conv` and `ssd`).

    Returns:
      out [B, T, D] in compute dtype, new conv_state, new ssm_state (f32).
    """
    c = self.config
    z, xBC, dt = self._split_in_proj(u.astype(c.compute_dtype), name="mamba2_in_proj")
    # Under a sequence mesh axis (train/step.py) the conv starts from the previous piece's
    # inputs and the SSD stitches the pieces' states; otherwise both are the plain ones.
    xBC, conv_state = causal_conv(xBC, seq_par.conv_state_in_context(xBC, conv_state, reset),
                                  self.conv_weight[...], self.conv_bias[...], reset)
    conv_state = seq_par.last_piece_state(conv_state)
    x, B, C = self._split_xBC(checkpoint_name(xBC, "mamba2_conv"))
    A = -jnp.exp(self.A_log[...].astype(f32))                      # [H]
    y, ssm_state = seq_par.ssd_in_context(
        x, dt, A, B, C, D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
        dt_limit=c.dt_limit, initial_state=ssm_state, chunk_len=c.chunk_len,
        impl=c.ssd_impl, reset=reset)                              # [B,T,H,P]
    out = self._output(checkpoint_name(y, "mamba2_ssd"), z)
    return checkpoint_name(out, "mamba2_out_proj"), conv_state, ssm_state

  def step(self, u: Array, conv_state: Array, ssm_state: Array) -> tuple[Array, Array, Array]:
    """Recurrent mode, one token: u [B, D] -> (out [B, D], conv_state, ssm_state).

    h = exp(dt A) h + dt x B^T;  y = h C + D x, per head, in f32.
    """
    c = self.config
    z, xBC, dt = self._split_in_proj(u.astype(c.compute_dtype))
    xBC, conv_state = causal_conv_step(xBC, conv_state, self.conv_weight[...],
                                       self.conv_bias[...])
    x, B, C = self._split_xBC(xBC)                                 # [B,H,P], [B,G,N], [B,G,N]
    heads_per_group = c.n_heads // c.n_groups
    B = jnp.repeat(B.astype(f32), heads_per_group, axis=1)         # [B, H, N]
    C = jnp.repeat(C.astype(f32), heads_per_group, axis=1)         # [B, H, N]
    dt = process_dt(dt, self.dt_bias[...], True, c.dt_limit)       # [B, H] f32
    A = -jnp.exp(self.A_log[...].astype(f32))                      # [H]
    x32 = x.astype(f32)
    decay = jnp.exp(dt * A)[:, :, None, None]                      # [B, H, 1, 1]
    # Products and a sum over N, not einsums: they fuse into one or two kernels, where a
    # dot_general with batch axes may become small GEMM calls (one token's step is bound by
    # reading the weights; every extra kernel per layer and token costs microseconds).
    ssm_state = (decay * ssm_state.astype(f32)
                 + (dt[:, :, None] * x32)[..., None] * B[:, :, None, :])  # [B, H, P, N]
    y = (jnp.sum(ssm_state * C[:, :, None, :], axis=-1)
         + self.D[...].astype(f32)[:, None] * x32)                # [B, H, P]
    return self._output(y.astype(x.dtype), z), conv_state, ssm_state


class Mamba2Block(nnx.Module):
  """Pre-norm residual block, residual stream in f32: h + mixer(norm(h))."""

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=config.param_dtype)
    self.mixer = Mamba2Mixer(config, rngs=rngs)

  def __call__(self, h: Array, conv_state: Array, ssm_state: Array,
               reset: Array | None = None) -> tuple[Array, Array, Array]:
    """h [B, T, D] f32 and the layer's states -> (h [B, T, D] f32, conv_state, ssm_state).

    reset: [B, T] bool, optional: True where a packed segment starts.
    With `config.block_impl == "fused"` the same function with a hand-written backward
    (models/fused_block.py).
    """
    config = self.mixer.config
    if config.block_impl == "fused":
      from ma2mba_jax.models import fused_block  # it imports this module
      return fused_block.fused_block_apply(config, fused_block.block_params(self), h,
                                           conv_state, ssm_state, reset)
    out, conv_state, ssm_state = self.mixer(self.norm(h), conv_state, ssm_state, reset)
    return h.astype(f32) + out.astype(f32), conv_state, ssm_state

  def step(self, h: Array, conv_state: Array, ssm_state: Array) -> tuple[Array, Array, Array]:
    """One token: h [B, D] f32 and the layer's states -> (h [B, D] f32, states)."""
    out, conv_state, ssm_state = self.mixer.step(self.norm(h), conv_state, ssm_state)
    return h.astype(f32) + out.astype(f32), conv_state, ssm_state


# --------------------------------------------------------------------------- pure layer functions


def block_apply(block_graphdef: nnx.GraphDef, layer_params: nnx.State, h: Array,
                conv_state: Array, ssm_state: Array, reset: Array | None = None
                ) -> tuple[Array, Array, Array]:
  """Applies ONE layer, as a pure function of all its arguments (what MA-GC scans over).

  Args:
    block_graphdef: from `Mamba2LM.split_layers()`.
    layer_params: the stacked params indexed at one layer (leaves without the L axis).
    h: [B, T, D] f32, any T >= 1.
    conv_state: [B, C, K-1] f32 (C = conv_dim); ssm_state: [B, H, P, N] f32.
    reset: [B, T] bool, optional: True where a packed segment starts (the states restart
      just before that token; see `causal_conv` and `ssd`). None: no segments.

  Returns:
    (h [B, T, D] f32, conv_state [B, C, K-1] f32, ssm_state [B, H, P, N] f32), the states
    after the last token. Differentiable in layer_params, h and both states.
  """
  block = nnx.merge(block_graphdef, layer_params)
  return block(h, conv_state, ssm_state, reset)


def block_step(block_graphdef: nnx.GraphDef, layer_params: nnx.State, h: Array,
               conv_state: Array, ssm_state: Array) -> tuple[Array, Array, Array]:
  """`block_apply` for one token: h [B, D] f32 -> (h [B, D], conv_state, ssm_state)."""
  block = nnx.merge(block_graphdef, layer_params)
  return block.step(h, conv_state, ssm_state)


class LayerStates(NamedTuple):
  """Every layer's recurrent state (f32): what the chunked mode carries and step caches.

  conv: [L, B, C, K-1], the last K-1 inputs of each layer's conv (C = conv_dim).
  ssm:  [L, B, H, P, N], each layer's SSM state.
  """
  conv: Array
  ssm: Array


def _scan_layers(layer_fn, graphdef: nnx.GraphDef, stacked_params: nnx.State, h: Array,
                 states: LayerStates, **kwargs) -> tuple[Array, LayerStates]:
  """h through every layer with `layer_fn` (block_apply or block_step) in a lax.scan;
  kwargs (block_apply's reset) go to every layer."""
  def body(h, xs):
    layer_params, conv_state, ssm_state = xs
    h, conv_state, ssm_state = layer_fn(graphdef, layer_params, h, conv_state, ssm_state,
                                        **kwargs)
    return h, (conv_state, ssm_state)

  h, (conv, ssm) = jax.lax.scan(body, h, (stacked_params, states.conv, states.ssm))
  return h, LayerStates(conv=conv, ssm=ssm)


# --------------------------------------------------------------------------- the LM


class Mamba2LM(nnx.Module):
  """Embedding -> L Mamba-2 blocks (stacked, scanned) -> final RMSNorm -> logits.

  Parameters (nnx state paths; leaves of `layers` carry a leading L axis):
    embedding                       [V, D]
    layers.norm.weight              [L, D]
    layers.mixer.in_proj.kernel     [L, D, 2E + 2GN + H]
    layers.mixer.conv_weight        [L, K, C]
    layers.mixer.conv_bias          [L, C]
    layers.mixer.dt_bias / A_log / D  [L, H]
    layers.mixer.norm.weight        [L, E]
    layers.mixer.out_proj.kernel    [L, E, D]
    final_norm.weight               [D]
    lm_head.kernel                  [D, V]   (only when tie_embeddings is False)
  """

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    embedding = 0.02 * jax.random.normal(rngs.params(), (c.padded_vocab_size, c.d_model), f32)
    self.embedding = nnx.Param(embedding.astype(c.param_dtype))              # [V, D]
    self.layers = _stacked_blocks(c, rngs)
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = Linear(c.d_model, c.padded_vocab_size, compute_dtype=c.compute_dtype,
                            param_dtype=c.param_dtype,
                            kernel_init=_torch_linear_init(c.d_model), rngs=rngs)

  # -- pieces used by MA-GC and the video model

  def embed(self, tokens: Array) -> Array:
    """tokens int32 [B, T] -> h [B, T, D] f32."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(f32)

  def head(self, h: Array) -> Array:
    """h [B, T, D] -> logits [B, T, V] f32 (final norm, then the tied or untied projection).

    V is the padded vocabulary (`config.padded_vocab_size`), as in the released models.
    """
    cd = self.config.compute_dtype
    x = self.final_norm(h).astype(cd)
    if self.config.tie_embeddings:
      return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(cd),
                        preferred_element_type=f32)
    return jnp.einsum("...d,dv->...v", x, self.lm_head.kernel[...].astype(cd),
                      preferred_element_type=f32)

  def split_layers(self) -> tuple[nnx.GraphDef, nnx.State]:
    """-> (block_graphdef, stacked_params): stacked_params' leaves are [L, ...]."""
    return nnx.split(self.layers)

  def init_states(self, batch_size: int) -> LayerStates:
    """Zero states for every layer: conv [L, B, C, K-1], ssm [L, B, H, P, N], f32."""
    c = self.config
    return LayerStates(
        conv=jnp.zeros((c.n_layers, batch_size, c.conv_dim, c.d_conv - 1), f32),
        ssm=jnp.zeros((c.n_layers, batch_size, c.n_heads, c.head_dim, c.d_state), f32))

  def apply_layers(self, h: Array, states: LayerStates, reset: Array | None = None
                   ) -> tuple[Array, LayerStates]:
    """h [B, T, D] f32 through all layers (a scan of `block_apply`) -> (h, final states).

    reset: [B, T] bool, optional: True where a packed segment starts (every layer's state
    restarts there).
    """
    graphdef, stacked = self.split_layers()
    kwargs = {} if reset is None else {"reset": reset}
    return _scan_layers(block_apply, graphdef, stacked, h, states, **kwargs)

  # -- the three modes

  def __call__(self, tokens: Array | None = None, *, embeds: Array | None = None,
               states: LayerStates | None = None, return_states: bool = False,
               reset: Array | None = None):
    """Full mode (states None: zeros) or chunked mode (states given).

    Args:
      tokens: int32 [B, T]; or `embeds` [B, T, D] (e.g. text with frame features), not both.
      states: LayerStates before the first token, or None for a fresh sequence.
      return_states: also return the LayerStates after the last token.
      reset: [B, T] bool, optional, for rows packing several sequences: True where one
        starts (`kernels.ssd.reset_from_segment_ids`). Each segment's logits are those of
        the segment alone; `states` reach only the tokens before the first reset.

    Returns:
      logits [B, T, V] f32, and the final LayerStates if return_states.
    """
    if (tokens is None) == (embeds is None):
      raise ValueError("Mamba2LM: pass exactly one of tokens [B, T] or embeds [B, T, D]")
    h = self.embed(tokens) if embeds is None else embeds.astype(f32)
    if h.ndim != 3 or h.shape[-1] != self.config.d_model:
      raise ValueError(f"Mamba2LM: expected inputs [B, T] or [B, T, {self.config.d_model}], "
                       f"got {h.shape}")
    if states is None:
      states = self.init_states(h.shape[0])
    h, states = self.apply_layers(h, states, reset)
    logits = self.head(h)
    return (logits, states) if return_states else logits

  def step(self, token: Array, cache: LayerStates) -> tuple[Array, LayerStates]:
    """Recurrent mode: token int32 [B] and the cache -> (logits [B, V] f32, new cache)."""
    h = self.embed(token)                                          # [B, D]
    graphdef, stacked = self.split_layers()
    h, cache = _scan_layers(block_step, graphdef, stacked, h, cache)
    return self.head(h), cache

  def num_params(self) -> int:
    """Number of parameters (every nnx.Param element)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _stacked_blocks(config: Mamba2Config, rngs: nnx.Rngs) -> Mamba2Block:
  """One Mamba2Block whose params have a leading L axis, each layer initialised apart."""
  @nnx.split_rngs(splits=config.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs: nnx.Rngs) -> Mamba2Block:
    return Mamba2Block(config, rngs=rngs)
  return create(rngs)
