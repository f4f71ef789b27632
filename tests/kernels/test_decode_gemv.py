"""kernels/decode/gemv (in_proj with the RMS norm inside, out_proj with the gated norm and
the residual inside, out_proj_folded with the gated norm applied after the matmul) in the
Pallas interpreter against plain jnp references of the same operations: the normalised
input rounded to the compute dtype, an f32-accumulated matmul, the output rounded to cd;
in_proj_reduce (XLA) against float64. Both row paths (vector: 1-4 rows unpadded; tl.dot: 16 rows),
split-K on and off, one and two groups, float32 and bfloat16, with blocks that do not
divide the shapes (shrunk by `effective`). Fixed seeds, small shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ma2mba_jax.kernels.decode import gemv
from ma2mba_jax.testing import rel_err

f32 = jnp.float32
EPS = 1e-5
D, E, H = 128, 256, 16            # model width, inner width, heads (head dim 16)
NP = 384                          # in_proj's padded output width (a multiple of 128)
# Only the f32 summation order differs from the reference (worst relative error measured
# on CPU over seeds 0-2 of every case below: 3.4e-7 in float32; tolerance 2x, rounded up).
# In bfloat16 an output may then round to its neighbour: at most one bf16 ulp (2^-7
# relative at worst) on a few entries (measured: at most 1 an array, seeds 0-2 and the
# seeds below); allowed: 2 + 0.2% of the entries.
F32_TOL = 1e-6
BF16_FLIPS = 0.002
CONFIGS = {
    "default": None,
    "small_blocks": gemv.Config(block_n=16, block_k=32, num_warps=2),
    "split2": gemv.Config(block_n=32, block_k=32, split_k=2),
    "split4_oversize": gemv.Config(block_n=1024, block_k=32, split_k=4),
    "split3_shrunk": gemv.Config(block_n=16, block_k=64, split_k=3),
    "unrolled_split2": gemv.Config(block_n=8, block_k=32, split_k=2, unroll=True),
    "ahead_evict_split2": gemv.Config(block_n=16, block_k=32, split_k=2,
                                      eviction="evict_first", ahead=True),
    "persistent": gemv.Config(block_n=8, block_k=32, programs=3, eviction="evict_first"),
}


def _inputs(seed: int, rows: int, cd):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), f32)
  return dict(h=normal(rows, D), w_norm=1 + 0.1 * normal(D), w_in=(normal(NP, D) / 8).astype(cd),
              g=normal(rows, E), ss=jnp.abs(normal(rows, H)) * 16, w_gate=1 + 0.1 * normal(E),
              w_out=(normal(D, E) / 16).astype(cd))


def check(out, ref, cd, base=None):
  """out == ref up to the summation order (see F32_TOL and BF16_FLIPS); base: h, that
  out_proj adds to its cd-rounded product (compared as out - h), exactly in both."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  base = 0.0 if base is None else np.asarray(base, np.float64)
  if cd == jnp.float32:
    assert rel_err(out - base, ref - base) < F32_TOL, rel_err(out - base, ref - base)
    return
  # one bf16 ulp of the product, plus the f32 rounding of h + product
  bound = 2.0 ** -7 * np.abs(ref - base) + 2.0 ** -22 * np.abs(ref) + 1e-30
  np.testing.assert_array_less(np.abs(out - ref), bound)
  assert np.sum(out != ref) <= 2 + BF16_FLIPS * out.size, np.sum(out != ref)


def in_proj_reference(h, w_norm, w_t):
  cd = w_t.dtype
  scale = jax.lax.rsqrt(jnp.mean(h * h, axis=1) + EPS)
  u = (h * scale[:, None] * w_norm[None, :]).astype(cd)
  return jnp.einsum("rd,nd->rn", u, w_t, preferred_element_type=f32).astype(cd)


def out_proj_reference(g, ss, w_norm, w_t, h, n_groups, rows):
  cd = w_t.dtype
  r, e = g.shape
  group = e // n_groups
  ss = ss.reshape(r, n_groups, -1).sum(-1)                                    # [R, G]
  scale = jnp.repeat(jax.lax.rsqrt(ss / group + EPS), group, axis=1)          # [R, E]
  u = (g * scale * w_norm[None, :]).astype(cd)
  out = h + jnp.einsum("re,de->rd", u, w_t, preferred_element_type=f32).astype(cd).astype(f32)
  return jnp.where(jnp.arange(r)[:, None] < rows, out, h)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("cd", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_in_proj_matches_the_reference(config, rows, cd):
  x = _inputs(rows, rows, cd)
  out = gemv.in_proj(x["h"], x["w_norm"], x["w_in"], eps=EPS, config=CONFIGS[config],
                     interpret=True)
  assert out.shape == (rows, NP) and out.dtype == cd
  check(out, in_proj_reference(x["h"], x["w_norm"], x["w_in"]), cd)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("rows,live", [(1, 1), (4, 3), (16, 16), (16, 5)])
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("cd", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_out_proj_matches_the_reference(config, rows, live, n_groups, cd):
  x = _inputs(10 * rows + live, rows, cd)
  # rows >= live hold garbage (as mixer_step leaves them): never read.
  dead = jnp.arange(rows)[:, None] >= live
  g, ss = jnp.where(dead, jnp.nan, x["g"]), jnp.where(dead, jnp.nan, x["ss"])
  out = gemv.out_proj(g, ss, x["w_gate"], x["w_out"], x["h"], eps=EPS, n_groups=n_groups,
                      rows=live, config=CONFIGS[config], interpret=True)
  assert out.shape == (rows, D) and out.dtype == f32
  ref = out_proj_reference(x["g"], x["ss"], x["w_gate"], x["w_out"], x["h"], n_groups, live)
  np.testing.assert_array_equal(out[live:], x["h"][live:])
  check(out[:live], ref[:live], cd, base=x["h"][:live])


def test_effective_configs_fit_the_shapes():
  # 2.7B shapes: D = 2560 = 5 * 512, E = 5120, Np = 10752 = 42 * 256.
  cfg = gemv.effective("in_proj", 1, 10752, 2560, 1, gemv.Config(32, 1024, split_k=4))
  assert cfg == gemv.Config(32, 512, split_k=1)          # 5 blocks: no split of 4 divides
  cfg = gemv.effective("in_proj", 4, 10752, 2560, 1, gemv.Config(32, 512, num_warps=2))
  assert cfg.block_k == 64                               # 32 x 64 x 4 rows <= 4096 x 2
  cfg = gemv.effective("out_proj", 1, 2560, 5120, 1, gemv.Config(8, 1024, split_k=4))
  assert cfg == gemv.Config(8, 1024, split_k=1)          # 5 blocks again
  cfg = gemv.effective("out_proj", 1, 2560, 5120, 1, gemv.Config(8, 512, split_k=4))
  assert cfg == gemv.Config(8, 512, split_k=2)           # 10 blocks: 2 pieces of 5
  cfg = gemv.effective("out_proj", 16, 2560, 5120, 2, gemv.Config(4, 8))
  assert (cfg.block_n, cfg.block_k) == (16, 16)          # tl.dot's floor of 16
  assert [gemv.padded_rows(b) for b in (1, 3, 4, 5, 16)] == [1, 3, 4, 16, 16]
  with pytest.raises(ValueError, match="at most 16"):
    gemv.padded_rows(17)
  with pytest.raises(ValueError, match="padded_rows"):
    gemv.path_of(8)


@pytest.mark.parametrize("programs", [1, 3, 64])
@pytest.mark.parametrize("rows,live", [(1, 1), (4, 3)])
def test_persistent_programs_give_the_grids_sums_exactly(programs, rows, live):
  # Config.programs changes which program computes a column block, not the sums: the same
  # bits as the one-program-a-block grid with the same blocks (bf16, two groups).
  cd = jnp.bfloat16
  x = _inputs(100 + programs, rows, cd)
  grid, persistent = gemv.Config(8, 32), gemv.Config(8, 32, programs=programs)
  assert gemv.effective("in_proj", rows, NP, D, 1, persistent).programs == min(programs,
                                                                               NP // 8)
  ins = [gemv.in_proj(x["h"], x["w_norm"], x["w_in"], eps=EPS, config=c, interpret=True)
         for c in (grid, persistent)]
  np.testing.assert_array_equal(ins[0], ins[1])
  outs = [gemv.out_proj(x["g"], x["ss"], x["w_gate"], x["w_out"], x["h"], eps=EPS,
                        n_groups=2, rows=live, config=c, interpret=True)
          for c in (grid, persistent)]
  np.testing.assert_array_equal(outs[0], outs[1])
  # The tl.dot path and split-K have no persistent form: the grid runs instead.
  assert gemv.effective("in_proj", gemv.ROWS, NP, D, 1, persistent).programs == 0
  assert gemv.effective("out_proj", 1, D, E, 1, persistent._replace(split_k=2)).programs == 0


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("cd", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_in_proj_reduce_is_the_matmul_with_the_sum_of_squares_in_a_padding_column(rows, cd):
  # in_proj_reduce(u, h, Wt, n): u @ Wt^T in f32 (XLA's reduction), column n replaced by
  # sum(h^2), against float64 (the f32 sums' rounding only).
  x = _inputs(300 + rows, rows, cd)
  n = NP - 5
  w = x["w_in"].at[n:].set(0)                                    # n.. are padding rows
  u = (x["h"] * x["w_norm"]).astype(cd)
  raw = gemv.in_proj_reduce(u, x["h"], w, n)
  assert raw.shape == (rows, NP) and raw.dtype == f32
  ref = np.asarray(u, np.float64) @ np.asarray(w, np.float64).T
  ref[:, n] = np.sum(np.asarray(x["h"], np.float64) ** 2, axis=1)
  assert rel_err(raw, ref) < F32_TOL
  with pytest.raises(ValueError, match="not a row"):
    gemv.in_proj_reduce(u, x["h"], w, NP)


def out_proj_folded_reference(yw, ss, w_t, h, n_groups):
  cd = w_t.dtype
  r, e = yw.shape
  group = e // n_groups
  scale = jax.lax.rsqrt(ss.reshape(r, n_groups, -1).sum(-1) / group + EPS)     # [R, G]
  parts = jnp.einsum("rge,dge->rgd", yw.reshape(r, n_groups, group),
                     w_t.reshape(-1, n_groups, group), preferred_element_type=f32)
  return h + jnp.sum(parts * scale[:, :, None], axis=1).astype(cd).astype(f32)


@pytest.mark.parametrize("config", ["default", "small_blocks", "ahead_evict_split2"])
@pytest.mark.parametrize("rows,live", [(1, 1), (4, 3), (16, 16), (16, 5)])
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("cd", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_out_proj_folded_matches_the_reference(config, rows, live, n_groups, cd):
  # The gated norm folded: the group's 1/rms times its part of yw @ Wt^T, summed, rounded,
  # + h; rows >= live (garbage, as the mixer leaves padding) give h; u = h_new * w_next.
  x = _inputs(400 + 10 * rows + live, rows, cd)
  yw = (x["g"] * x["w_gate"]).astype(cd)
  dead = jnp.arange(rows)[:, None] >= live
  w_next = 1 + 0.1 * jnp.asarray(np.random.default_rng(live).normal(size=D), f32)
  out, u = gemv.out_proj_folded(jnp.where(dead, jnp.nan, yw).astype(cd),
                                jnp.where(dead, jnp.nan, x["ss"]), x["w_out"], x["h"], w_next,
                                eps=EPS, n_groups=n_groups, rows=live,
                                config=CONFIGS[config], interpret=True)
  assert out.shape == (rows, D) and out.dtype == f32 and u.dtype == cd
  ref = out_proj_folded_reference(yw, x["ss"], x["w_out"], x["h"], n_groups)
  np.testing.assert_array_equal(out[live:], x["h"][live:])
  check(out[:live], ref[:live], cd, base=x["h"][:live])
  np.testing.assert_array_equal(u, (out * w_next[None, :]).astype(cd))
