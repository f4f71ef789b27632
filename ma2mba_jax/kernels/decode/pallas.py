"""`mixer_step` as one Pallas kernel (impl="pallas"; Triton lowering on GPU, the Pallas
interpreter elsewhere). Programs (batch row b, head h, part): `split` programs a head (SPLIT
by default), each doing the whole middle of the layer for P / split of its head's rows: the
conv of its x channels and of its group's N B- and N C-channels (every program of a group
recomputes those 2N, a few hundred multiply-adds), dt, its [P / split, N] slice of the state
update and readout, the gating and its sum of squares. Every load is issued before any
store. The SSM state stack is aliased to the output, so the layer's slice is updated in
place; the conv state goes to a fresh [B, C, K-1] output (the B/C channels are read by
every program of a group, so no program may overwrite them in place), or, conv_in_place,
the conv stack is aliased too: each program writes its x channels' taps in place, the
group's first program the previous layer's B/C taps (bc_prev) and this layer's to a small
fresh output. in_norm: the RMS norm's 1/rms from raw's sum-of-squares column. Refs are whole
arrays, indexed by program id; every load is a vector of P / split or N elements (powers of
two, as Triton needs).

prefetch: the kernel reads far less than the card's memory bandwidth allows, so extra
programs (heads past H on the grid) read the first `prefetch_rows` rows of another matrix,
the one the next kernel streams (the layer's out_proj), with the evict_last policy, so
that the next kernel finds them in L2 instead of memory. What they read only feeds a sum
each program writes to an output that is dropped; the mixer's results are the same."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ma2mba_jax.kernels.decode import Dims, MixerParams

Array = jax.Array
f32 = jnp.float32
# The launch defaults, from `python -m ma2mba_jax.bench.mixer` and the 2.7B LM's decoding on
# an H100 (BENCHMARKS.md, docs/bench/h100_r10): 4 programs of 2 warps a head, 4.5 us a layer
# in the decode step against 6.3 us for 1 program of 4 warps.
SPLIT = 4        # programs per head (mixer_step's split)
NUM_WARPS = 2
# The L2 prefetch (mixer_step's prefetch): on an H100, the 2.7B LM's out_proj [2560, 5120]
# went from 11.7 to 9.6 us a layer with its first 640 rows (6.5 MB) read by 320 programs of
# 2 rows while the mixer ran (which took 6.3 us instead of 5.4); 960 or 1280 rows, or 1 or
# 4 rows a program, or the programs before the mixer's on the grid were slower
# (BENCHMARKS.md, "Decoding, session 12").
PREFETCH_ROWS = 640          # rows of the next matrix read into L2 (mixer_step's default)
PREFETCH_ROWS_PER_PROGRAM = 2
PREFETCH_CHUNK = 1024        # columns a load


def _silu(v):
  return v / (1.0 + jnp.exp(-v))


def _softplus(v):
  # jax.nn.softplus's formula (logaddexp(v, 0)).
  return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _prefetch_chunk(cols: int) -> int:
  """Columns a prefetch load: the largest power of two <= PREFETCH_CHUNK dividing cols."""
  return math.gcd(cols, PREFETCH_CHUNK) if (PREFETCH_CHUNK & (PREFETCH_CHUNK - 1)) == 0 else 1


def _prefetch_kernel(pf_ref, sum_ref, *, program, rows: int, per_program: int):
  """Program `program` of the prefetch: rows [program * per_program, + per_program) of
  pf_ref [R, C] loaded (evict_last) and summed into sum_ref[program]."""
  cols = pf_ref.shape[1]
  chunk = _prefetch_chunk(cols)

  @pl.when(program * per_program < rows)
  def _():
    tiles = [plgpu.load(pf_ref.at[pl.ds(program * per_program, per_program),
                                  pl.ds(c0, chunk)], eviction_policy="evict_last")
             for c0 in range(0, cols, chunk)]                   # [per_program, chunk] each
    sum_ref[program] = sum(jnp.sum(t.astype(f32)) for t in tiles)


def _kernel(layer_ref, raw_ref, scale_ref, conv_w_ref, conv_b_ref, dt_bias_ref, a_log_ref,
            d_ref, norm_w_ref, conv_ref, ssm_ref, *refs, dims: Dims, gated_out: bool,
            split: int, in_norm: tuple[int, float] | None, in_place: bool, has_prev: bool,
            prefetch: tuple[int, int] | None):
  # in_place: conv_out_ref is the conv stack (aliased to conv_ref) and bc_out_ref this
  # layer's new B/C taps; has_prev: bc_prev_ref, the previous layer's, written here.
  # prefetch = (rows, per_program): pf_ref, the matrix, and pf_sum_ref (the last output).
  bc_prev_ref = refs[0] if has_prev else None
  pf_ref = refs[has_prev] if prefetch else None
  outs = refs[has_prev + bool(prefetch):]
  yw_ref, ss_ref, conv_out_ref, ssm_out_ref = outs[:4]
  bc_out_ref = outs[4] if in_place else None
  # (The program ids are read here: the interpreter cannot read them inside a pl.when.)
  ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))   # (b, h, part)
  mixer = functools.partial(
      _mixer, layer_ref, raw_ref, scale_ref, conv_w_ref, conv_b_ref, dt_bias_ref, a_log_ref,
      d_ref, norm_w_ref, conv_ref, ssm_ref, bc_prev_ref, yw_ref, ss_ref, conv_out_ref,
      ssm_out_ref, bc_out_ref, ids=ids, dims=dims, gated_out=gated_out, split=split,
      in_norm=in_norm)
  if prefetch is None:
    mixer()
    return
  b, h, part = ids
  pl.when(h < dims.n_heads)(mixer)

  @pl.when((h >= dims.n_heads) & (b == 0))
  def _():
    rows, per_program = prefetch
    _prefetch_kernel(pf_ref, outs[-1], program=(h - dims.n_heads) * split + part,
                     rows=rows, per_program=per_program)


def _mixer(layer_ref, raw_ref, scale_ref, conv_w_ref, conv_b_ref, dt_bias_ref, a_log_ref,
           d_ref, norm_w_ref, conv_ref, ssm_ref, bc_prev_ref, yw_ref, ss_ref, conv_out_ref,
           ssm_out_ref, bc_out_ref, *, ids, dims: Dims, gated_out: bool, split: int,
           in_norm: tuple[int, float] | None):
  """The program ids = (b, h, part) of the mixer proper (see the module docstring)."""
  in_place, has_prev = bc_out_ref is not None, bc_prev_ref is not None
  e, p, n, g, k = dims.d_inner, dims.head_dim, dims.d_state, dims.n_groups, dims.d_conv
  hpg = dims.n_heads // g
  ps = p // split                                              # this program's head rows
  cd = dims.compute_dtype
  b, h, part = ids                                             # part: which [ps] slice
  layer = layer_ref[0]
  group = h // hpg
  x0 = h * p + part * ps                                       # first x / z channel
  bc0, cc0 = e + group * n, e + g * n + group * n              # B's and C's conv channels

  # Every load first, every store last: the stores (the conv state, the SSM state aliased
  # to its input) would otherwise keep Triton from issuing later loads early, and each
  # load after a store costs another memory latency. The in_proj output is loaded raw and
  # scaled after the other loads.
  def raw(start, size):
    return raw_ref[b, pl.ds(start, size)].astype(f32)

  def taps(c0, size):
    """The conv state's K-1 taps of channels [c0, c0 + size)."""
    return [conv_ref[layer, b, pl.ds(c0, size), j].astype(cd).astype(f32)
            for j in range(k - 1)]

  raw_x, raw_b, raw_c = raw(e + x0, ps), raw(e + bc0, n), raw(e + cc0, n)
  raw_z = raw(x0, ps)                                          # [ps]
  raw_dt = raw(2 * e + 2 * g * n + h, 1)[0]
  def conv_params(c0, size):
    """The conv's bias and K weights of channels [c0, c0 + size)."""
    return (conv_b_ref[pl.ds(c0, size)].astype(f32),
            [conv_w_ref[j, pl.ds(c0, size)].astype(f32) for j in range(k)])

  x_taps, b_taps, c_taps = taps(x0, ps), taps(bc0, n), taps(cc0, n)
  first_of_group = (h % hpg == 0) & (part == 0)
  if has_prev:   # the previous layer's new B/C taps (its group's first program writes
    # them: the others' loads are masked off, no memory traffic)
    mask = jnp.broadcast_to(first_of_group, (n, 1))

    def prev(c0, j):
      return plgpu.load(bc_prev_ref.at[b, pl.ds(c0, n), pl.ds(j, 1)], mask=mask,
                        other=0.0)[:, 0]

    prev_b = [prev(group * n, j) for j in range(k - 1)]
    prev_c = [prev(g * n + group * n, j) for j in range(k - 1)]
  x_conv, b_conv, c_conv = conv_params(x0, ps), conv_params(bc0, n), conv_params(cc0, n)
  state = ssm_ref[layer, b, h, pl.ds(part * ps, ps), :]        # [ps, N] f32
  dt_bias = dt_bias_ref[h].astype(f32)
  a = -jnp.exp(a_log_ref[h].astype(f32))
  d_skip = d_ref[h].astype(f32)
  norm_w = None if gated_out else norm_w_ref[pl.ds(x0, ps)].astype(f32)
  if in_norm is None:
    scale = scale_ref[b]
  else:   # raw's column after the in_proj outputs: the sum of squares of the norm's input
    width, eps = in_norm
    scale = jax.lax.rsqrt(raw(2 * e + 2 * g * n + dims.n_heads, 1)[0] / width + eps)

  def proj(v):
    """In_proj output values as Linear rounds them."""
    return (v * scale).astype(cd).astype(f32)

  def conv(window, bias_weights):
    """silu(conv) over window (K-1 taps, the new input), rounded to cd."""
    out, weights = bias_weights
    for j in range(k):
      out = out + window[j] * weights[j]
    return _silu(out).astype(cd).astype(f32)

  x_taps.append(proj(raw_x))
  b_taps.append(proj(raw_b))
  c_taps.append(proj(raw_c))
  z = proj(raw_z)
  dt_raw = proj(raw_dt)
  x = conv(x_taps, x_conv)                                     # [ps]
  bmat = conv(b_taps, b_conv)                                  # [N] (every program of
  cmat = conv(c_taps, c_conv)                                  #  the group recomputes them)
  dt = _softplus(dt_raw + dt_bias)
  lo, hi = dims.dt_limit
  if lo > 0.0 or hi != float("inf"):
    dt = jnp.clip(dt, lo, hi)
  state = jnp.exp(dt * a) * state + (dt * x)[:, None] * bmat[None, :]
  y = jnp.sum(state * cmat[None, :], axis=1) + d_skip * x
  gated = y.astype(cd).astype(f32) * _silu(z)                  # [ps]

  ssm_out_ref[layer, b, h, pl.ds(part * ps, ps), :] = state
  for j in range(k - 1):
    if in_place:   # this program alone reads and writes its x channels
      conv_out_ref[layer, b, pl.ds(x0, ps), j] = x_taps[j + 1]
    else:
      conv_out_ref[b, pl.ds(x0, ps), j] = x_taps[j + 1]
  ss_ref[b, h * split + part] = jnp.sum(gated * gated)
  if gated_out:
    yw_ref[b, pl.ds(x0, ps)] = gated
  else:
    yw_ref[b, pl.ds(x0, ps)] = (gated * norm_w).astype(cd)

  # B's and C's new conv state: written once per group, by its first program; in place,
  # to bc_out (every program of the group reads the stack's old B/C taps, in any order),
  # and the previous layer's into the stack (no program reads that layer).
  @pl.when(first_of_group)
  def _():
    for j in range(k - 1):
      if in_place:
        bc_out_ref[b, pl.ds(group * n, n), j] = b_taps[j + 1]
        bc_out_ref[b, pl.ds(g * n + group * n, n), j] = c_taps[j + 1]
        if has_prev:
          conv_out_ref[layer - 1, b, pl.ds(bc0, n), j] = prev_b[j]
          conv_out_ref[layer - 1, b, pl.ds(cc0, n), j] = prev_c[j]
      else:
        conv_out_ref[b, pl.ds(bc0, n), j] = b_taps[j + 1]
        conv_out_ref[b, pl.ds(cc0, n), j] = c_taps[j + 1]


@functools.partial(jax.jit, static_argnames=("dims", "interpret", "num_warps", "gated_rows",
                                             "split", "in_norm", "conv_in_place",
                                             "prefetch_rows"))
def mixer_step(layer: Array, raw: Array, in_scale: Array, params: MixerParams, conv: Array,
               ssm: Array, *, dims: Dims, interpret: bool = False,
               num_warps: int | None = None, gated_rows: int | None = None,
               split: int | None = None, in_norm: tuple[int, float] | None = None,
               conv_in_place: bool = False, bc_prev: Array | None = None,
               prefetch: Array | None = None, prefetch_rows: int | None = None
               ) -> tuple[Array, ...]:
  """See the package docstring; the ssm stack is updated in place (aliased). raw: [R, >=
  2E+2GN+H] in any float dtype (in_norm: > 2E+2GN+H columns), rows >= B = in_scale's length
  never read. split: programs
  per head (each takes P / split of its rows; a power of two dividing P); ss then holds
  one sum per program, [rows, H * split], a head's `split` sums side by side. Defaults:
  split SPLIT (at most head_dim), num_warps NUM_WARPS. prefetch [R, C]: its first
  prefetch_rows rows (at most R, a multiple of PREFETCH_ROWS_PER_PROGRAM; 0: none; default
  PREFETCH_ROWS, or fewer to fit R, none if no power of two >= 64 divides C) are read into
  L2 by extra programs, in loads of up to PREFETCH_CHUNK columns; the results do not
  change."""
  p = dims.head_dim
  split = min(SPLIT, p) if split is None else split
  num_warps = NUM_WARPS if num_warps is None else num_warps
  if split < 1 or p % split or split & (split - 1):
    raise ValueError(f"decode mixer_step: split must be a power of two dividing head_dim="
                     f"{p}, got {split}")
  batch = in_scale.shape[0]
  c = dims.d_inner + 2 * dims.n_groups * dims.d_state
  layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
  rows = batch if gated_rows is None else gated_rows
  first = (jax.ShapeDtypeStruct((rows, dims.d_inner), dims.compute_dtype) if gated_rows is None
           else jax.ShapeDtypeStruct((rows, dims.d_inner), f32))
  bc = 2 * dims.n_groups * dims.d_state
  out_shape = [first,                                                            # yw | g
               jax.ShapeDtypeStruct((rows, dims.n_heads * split), f32),          # ss
               (jax.ShapeDtypeStruct(conv.shape, f32) if conv_in_place           # conv
                else jax.ShapeDtypeStruct((batch, c, dims.d_conv - 1), f32)),
               jax.ShapeDtypeStruct(ssm.shape, f32)]                             # ssm
  if conv_in_place:
    out_shape.append(jax.ShapeDtypeStruct((batch, bc, dims.d_conv - 1), f32))    # B/C taps
  elif bc_prev is not None:
    raise ValueError("decode mixer_step: bc_prev needs conv_in_place=True")
  inputs = [layer, raw, in_scale.astype(f32), *params, conv, ssm]
  aliases = {len(inputs) - 1: 3}                                      # the ssm stack
  if conv_in_place:
    aliases[len(inputs) - 2] = 2                                      # the conv stack
  if bc_prev is not None:
    inputs.append(bc_prev)
  extra_heads, pf = 0, None
  per = PREFETCH_ROWS_PER_PROGRAM
  rows_pf = prefetch_rows
  if prefetch is not None and prefetch_rows is None:   # the default, fitted to the matrix
    rows_pf = min(PREFETCH_ROWS, prefetch.shape[0]) // per * per
    if _prefetch_chunk(prefetch.shape[-1]) < 64:   # too many small loads: none
      rows_pf = 0
  if prefetch is not None and rows_pf:
    if prefetch.ndim != 2 or not 0 < rows_pf <= prefetch.shape[0] or rows_pf % per:
      raise ValueError(f"decode mixer_step: prefetch_rows={rows_pf} of a {prefetch.shape} "
                       f"matrix: expected a multiple of {per} rows (PREFETCH_ROWS_PER_PROGRAM), "
                       f"at most the matrix's row count")
    programs = rows_pf // per
    extra_heads = -(-programs // split)
    pf = (rows_pf, per)
    inputs.append(prefetch)
    out_shape.append(jax.ShapeDtypeStruct((extra_heads * split,), f32))   # dropped sums
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  outs = tuple(pl.pallas_call(
      functools.partial(_kernel, dims=dims, gated_out=gated_rows is not None, split=split,
                        in_norm=in_norm, in_place=conv_in_place,
                        has_prev=bc_prev is not None, prefetch=pf),
      grid=(batch, dims.n_heads + extra_heads, split), out_shape=out_shape,
      input_output_aliases=aliases, interpret=interpret, **kwargs)(*inputs))
  return outs[:-1] if pf else outs
