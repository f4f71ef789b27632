"""Video-Ma²mba: preset sizes (abstractly), interleaving, micro-batched encoding, gradients,
and loading converted CLIP weights into the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ma2mba_jax.convert.clip import CheckpointError, load_clip_vision, load_clip_vision_into
from ma2mba_jax.models.video_lm import VideoMa2mba
from ma2mba_jax.models.video_presets import video_config
from tests.convert.test_clip_convert import random_clip_tensors, write_checkpoint

CLIP_L_336_PARAMS = 303_507_456  # openai/clip-vit-large-patch14-336's vision tower


def n_params(tree) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(tree, nnx.Param)))


@pytest.mark.parametrize("name,llm_width,paper_billions", [
    ("0.7b", 1024, 0.7), ("1.8b", 2048, 1.8), ("3.1b", 2560, 3.1)])
def test_full_preset_parameter_counts(name, llm_width, paper_billions):
  cfg = video_config(name)
  model = nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0)))
  assert cfg.tokens_per_frame == 144 and cfg.image_size == 336
  assert n_params(model.vision) == CLIP_L_336_PARAMS
  # 2-layer MLP 1024 -> C -> C with biases.
  assert n_params(model.projector) == 1024 * llm_width + llm_width + llm_width ** 2 + llm_width
  assert n_params(model.llm) == model.llm.num_params()
  total = n_params(model)
  assert total == CLIP_L_336_PARAMS + n_params(model.projector) + n_params(model.llm)
  # The paper's totals count the LM head as a matrix of its own (as the checkpoint lists it
  # beside the tied embedding); our tied count is lower by V * C.
  lcfg = model.llm.config
  assert lcfg.tie_embeddings
  head = lcfg.padded_vocab_size * lcfg.d_model
  assert round((total + head) / 1e9, 1) == paper_billions, total + head


def test_full_preset_forward_shapes():
  """The 0.7B model traced end to end on abstract inputs (nothing runs)."""
  cfg = video_config("0.7b", compute_dtype="bfloat16", frames_per_microbatch=3)
  model = nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0)))
  b, f, t = 1, 5, 800
  spec = jax.ShapeDtypeStruct
  args = (spec((b, t), jnp.int32), spec((b, t), jnp.int32), spec((b, f, 336, 336, 3), jnp.uint8),
          spec((b, f), jnp.bool_))
  vis = nnx.eval_shape(lambda m, fr, fm: m.encode_frames(fr, fm), model, args[2], args[3])
  assert vis.shape == (b, f * 144, 1024) and vis.dtype == jnp.float32
  logits = nnx.eval_shape(lambda m, *a: m(*a), model, *args)
  assert logits.shape == (b, t, model.llm.config.padded_vocab_size)


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError, match=r"0\.7b, 1\.8b, 3\.1b, tiny"):
    video_config("7b")
  with pytest.raises(ValueError, match="frames_per_microbatch"):
    video_config("tiny", frames_per_microbatch=0)
  with pytest.raises(ValueError, match=r"unknown Mamba-2 preset '13b'.*370m"):
    video_config("tiny", llm="13b")
  with pytest.raises(ValueError, match=r"unknown vision preset 'vit-g'.*clip-l-336"):
    video_config("tiny", vision="vit-g")
  with pytest.raises(ValueError, match="compute_dtype"):
    video_config("tiny", compute_dtype="float16")


def test_config_overrides_reach_the_parts():
  cfg = video_config("tiny", llm_vocab_size=50277, compute_dtype="bfloat16", ssd_impl="xla")
  lcfg = cfg.llm_config
  assert (lcfg.vocab_size, lcfg.padded_vocab_size) == (50277, 50288)
  assert lcfg.compute_dtype == jnp.bfloat16 and lcfg.ssd_impl == "xla"
  assert video_config("tiny").llm_config.vocab_size == 250
  model = nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0)))
  assert model.llm.embedding.shape == (50288, 64)
  assert model.vision.layers.mlp.fc1.dtype == jnp.bfloat16  # the encoder computes in bf16
  assert model.projector.fc1.dtype == jnp.bfloat16
  assert model.projector.fc1.kernel.dtype == jnp.float32  # parameters stay float32


# ----------------------------------------------------------------- tiny model, real runs

B, F, T, S = 2, 3, 24, 32


@pytest.fixture(scope="module")
def model():
  return VideoMa2mba(video_config("tiny"), rngs=nnx.Rngs(0))


def make_batch(k: int, seed: int = 0):
  """Row 0: frames 0 and 1 (2K placeholders) after 2 text tokens, then text, with frame 2
  padding. Row 1: frame 0 after 1 text token, text, frame 1 later (a second turn), and
  frame 2 padding. Returns tokens, vision_index, frames, frame_mask and the expected
  (row, position) -> (frame, token) map."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (B, F, S, S, 3), dtype=np.uint8)
  frame_mask = np.array([[True, True, False], [True, True, False]])
  frames[~frame_mask] = 0
  tokens = rng.integers(1, 250, (B, T)).astype(np.int32)
  vision_index = np.full((B, T), -1, np.int32)
  placement = {}  # (b, t) -> (f, k)
  for b, starts in ((0, [(0, 2), (1, 2 + k)]), (1, [(0, 1), (1, 1 + k + 5)])):
    for f, start in starts:
      for j in range(k):
        vision_index[b, start + j] = f * k + j
        placement[(b, start + j)] = (f, j)
  tokens[vision_index >= 0] = 250  # a `<|frame|>`-like id past the tokenizer's vocabulary
  return tokens, vision_index, frames, frame_mask, placement


def test_interleaving_puts_each_frames_tokens_at_its_placeholders(model):
  k = model.config.tokens_per_frame
  tokens, vision_index, frames, frame_mask, placement = make_batch(k)
  embeds = np.asarray(model.embed_inputs(tokens, vision_index, frames, frame_mask))
  assert embeds.shape == (B, T, model.llm.config.d_model) and embeds.dtype == np.float32
  # Oracle: each frame encoded on its own (no micro-batching, no gather).
  per_frame = {(b, f): np.asarray(model.encode_images(frames[b, f][None]))[0]
               for b in range(B) for f in range(F) if frame_mask[b, f]}
  text = np.asarray(model.llm.embed(tokens))
  seen = set()
  for b in range(B):
    for t in range(T):
      if (b, t) in placement:
        f, j = placement[(b, t)]
        np.testing.assert_allclose(embeds[b, t], per_frame[(b, f)][j], rtol=1e-5, atol=1e-5)
        seen.add((b, f, j))
      else:
        np.testing.assert_array_equal(embeds[b, t], text[b, t])
  # Every real frame's every token landed somewhere, and frames differ from each other.
  assert seen == {(b, f, j) for (b, f) in per_frame for j in range(k)}
  assert np.abs(per_frame[(0, 0)] - per_frame[(0, 1)]).max() > 1e-3


@pytest.mark.parametrize("per_microbatch", [1, 2, 4, 16])
def test_microbatched_encoding_equals_one_shot(model, per_microbatch):
  _, _, frames, frame_mask, _ = make_batch(model.config.tokens_per_frame, seed=1)
  frame_mask = np.ones_like(frame_mask)
  cfg = dataclasses.replace(model.config, frames_per_microbatch=per_microbatch)
  micro = VideoMa2mba(cfg, rngs=nnx.Rngs(1))
  nnx.update(micro, nnx.state(model))
  got = micro.encode_frames(frames, frame_mask)  # B*F = 6 frames: padded unless M | 6
  one_shot = model.encode_images(frames.reshape(B * F, S, S, 3))  # [B*F, K, C]
  np.testing.assert_allclose(got, np.asarray(one_shot).reshape(got.shape), rtol=1e-5,
                             atol=1e-5)


def test_masked_frames_give_zero_tokens_and_padding_micro_batches_are_skipped(model):
  _, _, frames, _, _ = make_batch(model.config.tokens_per_frame, seed=2)
  k = model.config.tokens_per_frame
  # With 2 frames per micro-batch, micro-batch 2 = (row 1 frame 1, row 1 frame 2) is all
  # padding and skipped; row 0 frame 2 shares a micro-batch with row 1 frame 0.
  frame_mask = np.array([[True, True, False], [True, False, False]])
  got = np.asarray(model.encode_frames(frames, frame_mask)).reshape(B, F, k, -1)
  want = np.asarray(model.encode_images(frames.reshape(B * F, S, S, 3))).reshape(got.shape)
  for b in range(B):
    for f in range(F):
      if frame_mask[b, f]:
        np.testing.assert_allclose(got[b, f], want[b, f], rtol=1e-5, atol=1e-5)
      else:
        assert np.all(got[b, f] == 0)


def _loss(model, batch, cot):
  tokens, vision_index, frames, frame_mask = batch
  return jnp.sum(model(tokens, vision_index, frames, frame_mask) * cot)


def _vision_loss(model, frames, frame_mask, cot):
  return jnp.sum(model.encode_frames(frames, frame_mask) * cot)


def _norm(tree) -> float:
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_gradients_reach_projector_and_encoder_through_the_lm(model):
  tokens, vision_index, frames, frame_mask, _ = make_batch(model.config.tokens_per_frame)
  batch = (tokens, vision_index, frames, frame_mask)
  cot = jax.random.normal(jax.random.key(0), (B, T, model.llm.config.padded_vocab_size))
  grads = nnx.jit(nnx.grad(_loss))(model, batch, cot)
  assert _norm(grads["projector"]["fc1"]) > 0 and _norm(grads["projector"]["fc2"]) > 0
  assert _norm(grads["vision"]["patch_embed"]) > 0 and _norm(grads["vision"]["pos_embed"]) > 0
  # Layers 0 and 1 produce the features; the last layer is never run.
  fc1 = np.asarray(grads["vision"]["layers"]["mlp"]["fc1"]["kernel"][...])  # [2, D, M]
  assert fc1.shape[0] == 2 and np.all(np.abs(fc1).sum(axis=(1, 2)) > 0)
  assert _norm(grads["vision"]["unused_layers"]) == 0
  assert _norm(grads["llm"]) > 0


def _one_shot_vision_loss(model, frames, frame_mask, cot):
  """The same loss with every frame encoded at once: no scan, checkpoint, cond or remat."""
  tokens = model.encode_images(frames.reshape(B * F, S, S, 3))  # [B*F, K, C]
  tokens = tokens * frame_mask.reshape(B * F, 1, 1)
  return jnp.sum(tokens.reshape(cot.shape) * cot)


def microbatch_remat_errors(model, seed: int) -> dict[str, float]:
  """Scan + checkpoint + cond over micro-batches and per-layer remat against one-shot
  encoding (gradients), and differentiating only 'projector' paths (a frozen encoder)
  against the full gradient's projector part; errors over the largest one-shot gradient."""
  _, _, frames, frame_mask, _ = make_batch(model.config.tokens_per_frame, seed=4 + seed)
  k, c = model.config.tokens_per_frame, model.llm.config.d_model
  cot = jax.random.normal(jax.random.key(1 + seed), (B, F * k, c))
  assert model.config.remat_vision and model.config.frames_per_microbatch < B * F
  grads = nnx.jit(nnx.grad(_vision_loss))(model, frames, frame_mask, cot)

  plain = VideoMa2mba(dataclasses.replace(model.config, remat_vision=False), rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(model))
  plain_grads = nnx.jit(nnx.grad(_one_shot_vision_loss))(plain, frames, frame_mask, cot)
  assert _norm(plain_grads["vision"]) > 0 and _norm(plain_grads["projector"]) > 0
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(plain_grads))
  max_diff = lambda xs, ys: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
                                for a, b in zip(jax.tree.leaves(xs), jax.tree.leaves(ys)))

  only_projector = nnx.DiffState(0, nnx.PathContains("projector"))
  frozen = nnx.jit(nnx.grad(_vision_loss, argnums=only_projector))(model, frames, frame_mask,
                                                                    cot)
  assert set(frozen.keys()) == {"projector"}
  return {"remat_vs_one_shot": max_diff(grads, plain_grads),
          "frozen_projector": max_diff(frozen["projector"], grads["projector"])}


# Sweep (python -m tests.models.model_tolerance_sweep, 20 seeds, f32 on CPU, 2026-11-26):
# remat vs one shot 5.7e-7 at worst, frozen projector equal exactly (over the largest
# gradient); bf16 encoding 5.1e-3 .. 1.0e-2. Tolerances: about 10x the worst seed.
REMAT_GRAD_TOL = 5e-6
FROZEN_GRAD_TOL = 1e-6


def test_microbatch_remat_gradients_equal_one_shot_and_freezing_by_path(model):
  errors = microbatch_remat_errors(model, 0)
  assert errors["remat_vs_one_shot"] < REMAT_GRAD_TOL, errors
  assert errors["frozen_projector"] < FROZEN_GRAD_TOL, errors


def test_encoder_memory_grows_only_by_frames_and_outputs():
  """What the backward pass keeps per extra frame: its uint8 pixels, its mask bit and its
  output tokens; the encoder's activations are recomputed one micro-batch at a time.
  Encoding all frames in one go without remat keeps every activation instead."""
  cfg = video_config("tiny")
  model = nnx.eval_shape(lambda: VideoMa2mba(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  k, c = cfg.tokens_per_frame, model.llm.config.d_model

  def residuals(encode, n_frames):
    frames = jax.ShapeDtypeStruct((1, n_frames, S, S, 3), jnp.uint8)
    loss = lambda p, fr: jnp.sum(encode(nnx.merge(graphdef, p), fr) ** 2)
    # The VJP closure's leaves are the saved residuals; shapes only, nothing runs.
    vjp = jax.eval_shape(lambda p, fr: jax.vjp(lambda q: loss(q, fr), p)[1], params, frames)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vjp))

  micro = lambda m, fr: m.encode_frames(fr, jnp.ones(fr.shape[:2], bool))
  one_shot = lambda m, fr: m.vision(fr[0])  # all frames at once, no remat
  per_frame = (residuals(micro, 8) - residuals(micro, 4)) / 4
  assert per_frame <= S * S * 3 + 1 + k * c, per_frame
  per_frame_plain = (residuals(one_shot, 8) - residuals(one_shot, 4)) / 4
  assert per_frame_plain > 4 * per_frame, (per_frame_plain, per_frame)


def bf16_encoding_error(model, seed: int) -> float:
  _, _, frames, frame_mask, _ = make_batch(model.config.tokens_per_frame, seed=5 + seed)
  bf16 = VideoMa2mba(dataclasses.replace(model.config, compute_dtype="bfloat16"),
                     rngs=nnx.Rngs(1))
  nnx.update(bf16, nnx.state(model))  # float32 parameters in both
  want = model.encode_frames(frames, frame_mask)
  got = bf16.encode_frames(frames, frame_mask)
  assert got.dtype == jnp.float32
  return float(jnp.abs(got - want).max() / jnp.abs(want).max())


BF16_MIN, BF16_TOL = 1e-3, 5e-2  # sweep above: 5.1e-3 .. 1.0e-2


def test_bfloat16_encoding_is_close_to_float32(model):
  assert BF16_MIN < bf16_encoding_error(model, 0) < BF16_TOL


def test_text_only_batch(model):
  tokens = np.random.default_rng(3).integers(0, 250, (B, T)).astype(np.int32)
  no_vision = np.full((B, T), -1, np.int32)
  np.testing.assert_array_equal(model.embed_inputs(tokens, no_vision),
                                model.llm.embed(tokens))


def test_converted_clip_weights_load_into_the_model(tmp_path, model):
  """The trainer's path: copy a CLIP checkpoint into the preset-built `model.vision`."""
  vcfg = model.config.vision_config
  hf = dict(hidden_size=vcfg.width, intermediate_size=vcfg.mlp_dim,
            num_hidden_layers=vcfg.n_layers, num_attention_heads=vcfg.n_heads,
            image_size=vcfg.image_size, patch_size=vcfg.patch_size, hidden_act="quick_gelu",
            layer_norm_eps=vcfg.norm_eps)
  write_checkpoint(tmp_path / "clip", random_clip_tensors(hf, seed=11), hf)
  target = VideoMa2mba(model.config, rngs=nnx.Rngs(2))
  load_clip_vision_into(target.vision, str(tmp_path / "clip"))
  loaded = load_clip_vision(str(tmp_path / "clip"))
  images = make_batch(model.config.tokens_per_frame)[2][:, 0]  # [B, S, S, 3]
  np.testing.assert_allclose(target.vision(images), loaded(images), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(target.vision(images) - model.vision(images))).max() > 0

  # A checkpoint of another width is refused, naming the tensors.
  wide = dict(hf, hidden_size=2 * vcfg.width)
  write_checkpoint(tmp_path / "wide", random_clip_tensors(wide, seed=12), wide)
  with pytest.raises(CheckpointError, match=r"vision_model\.embeddings\.patch_embedding\."
                     r"weight: expected shape \[32, 3, 8, 8\], got \[64, 3, 8, 8\]"):
    load_clip_vision_into(target.vision, str(tmp_path / "wide"))


def test_vision_attention_is_checked():
  from ma2mba_jax.models.video_presets import video_config
  with pytest.raises(ValueError, match="vision_attention"):
    video_config("tiny", vision_attention="flash")
  with pytest.raises(ValueError, match="needs compute_dtype 'bfloat16'"):
    video_config("tiny", vision_attention="cudnn")
  assert video_config("tiny", vision_attention="xla").vision_attention == "xla"


def test_with_vision_attention_shares_the_parameters_and_outputs():
  from ma2mba_jax.models.video_lm import fast_vision_attention, with_vision_attention
  from ma2mba_jax.models.video_presets import video_config
  model = VideoMa2mba(video_config("tiny"), rngs=nnx.Rngs(0))
  assert fast_vision_attention(model.config) is None              # CPU: the model's own
  xla = with_vision_attention(model, "xla")
  assert xla.config.vision_attention == "xla" and with_vision_attention(model, None) is model
  assert xla.vision.layers.attn.q.kernel[...] is model.vision.layers.attn.q.kernel[...]
  frames = jax.random.randint(jax.random.key(3), (2, model.config.image_size,
                                                   model.config.image_size, 3), 0, 256)
  np.testing.assert_array_equal(xla.encode_images(frames.astype(jnp.uint8)),
                                model.encode_images(frames.astype(jnp.uint8)))
