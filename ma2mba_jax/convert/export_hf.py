"""Export a trained Video-Ma²mba to Hugging Face files, and read such an export back.

    python -m ma2mba_jax.convert --export-hf runs/stage3 --out exports/video-ma2mba

The source is a trainer workdir (its model/ export) or a model export folder. Written:

    OUT/ma2mba_export.json     what the parts are and how they connect: the VideoConfig,
                               feature layer, pooling, tokens per frame, chat special ids
    OUT/llm/                   transformers `Mamba2ForCausalLM`: config.json +
                               model.safetensors (HF names and layouts, float32; a tied
                               head is not stored, as transformers saves it), and the
                               tokenizer the model was trained with (tokenizer.json,
                               tokenizer_config.json with the chat template as Jinja,
                               special_tokens_map.json): `AutoTokenizer` and
                               `Mamba2ForCausalLM.from_pretrained(OUT/llm)` read it
    OUT/vision/                transformers `CLIPVisionModel` (or `SiglipVisionModel`):
                               config.json, model.safetensors (`vision_model.*`),
                               preprocessor_config.json (image size, mean/std). Features
                               are `hidden_states[feature_layer]` without the class token
    OUT/projector/             the projector: config.json (pooling, widths, activation)
                               and model.safetensors (fc1/fc2 weight [out, in], bias)

`load_hf_export(OUT)` builds the VideoMa2mba back from these files through the HF loaders
(convert/mamba2.py, convert/clip.py), checking every part against the recorded config.
A model export holding a bare `Mamba2LM` (python -m ma2mba_jax.convert --src) exports its
LM only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from ma2mba_jax.convert import clip as vision_ckpt
from ma2mba_jax.convert import io as model_io
from ma2mba_jax.convert import mamba2 as mamba2_ckpt
from ma2mba_jax.models.mamba2 import Mamba2LM
from ma2mba_jax.models.video_lm import VideoMa2mba

FORMAT = "ma2mba_jax-hf-export"
FORMAT_VERSION = 1
EXPORT_FILE = "ma2mba_export.json"
LLM_DIR, VISION_DIR, PROJECTOR_DIR = "llm", "vision", "projector"
WEIGHTS = "model.safetensors"
SAFETENSORS_META = {"format": "pt"}  # transformers refuses safetensors without it


def _write_json(path: str | Path, data: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def _save(tensors: dict[str, np.ndarray], path: str | Path) -> None:
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
            metadata=SAFETENSORS_META)


def projector_tensors(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """Projector parameters -> {fc1,fc2}.{weight [out, in], bias} (float32)."""
  f32 = lambda a: np.asarray(a, np.float32)
  return {f"{fc}.{kind}": (f32(params[fc]["kernel"]).T if kind == "weight"
                           else f32(params[fc]["bias"]))
          for fc in ("fc1", "fc2") for kind in ("weight", "bias")}


def _source(src: str) -> tuple[str, str]:
  """(model export folder, the checkpoint argument for infer/checkpoint.py)."""
  src = os.fspath(src)
  nested = os.path.join(src, model_io.PARAMS_DIR)
  if os.path.isfile(os.path.join(src, "model", model_io.CONFIG_FILE)):
    return os.path.join(src, "model"), src
  if os.path.isfile(os.path.join(src, model_io.CONFIG_FILE)) and os.path.isdir(nested):
    return src, src
  raise FileNotFoundError(f"{src}: neither model/{model_io.CONFIG_FILE} (a trainer workdir) "
                          f"nor {model_io.CONFIG_FILE} (a model export) is there")


def _tokenizer_for(model_dir: str, checkpoint_arg: str, tokenizer: str):
  """The model's tokenizer (saved with it, or as infer/checkpoint.py finds it), or None
  when none can be found for a bare LM export."""
  from ma2mba_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415
  from ma2mba_jax.infer import checkpoint  # noqa: PLC0415
  from ma2mba_jax.data.errors import DataError  # noqa: PLC0415
  try:
    _, path = checkpoint.resolve(checkpoint_arg, tokenizer)
  except (ValueError, FileNotFoundError):
    if tokenizer:
      raise
    return None
  workdir = checkpoint.locate(checkpoint_arg)[1]
  try:
    return load_tokenizer(path, add_missing=checkpoint.adds_special_tokens(workdir))
  except DataError:
    if tokenizer:
      raise
    return None


def export_hf(src: str, out: str, *, tokenizer: str = "", overwrite: bool = False) -> str:
  """Writes the HF export of the model in `src` (a trainer workdir or a model export) to
  `out`; returns a summary. tokenizer: a tokenizer.json overriding the one found."""
  model_dir, checkpoint_arg = _source(src)
  out_path = Path(out).absolute()
  if out_path.exists() and any(out_path.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out_path} exists and is not empty; pass --overwrite to "
                            "replace it")
    for name in (LLM_DIR, VISION_DIR, PROJECTOR_DIR, EXPORT_FILE):
      target = out_path / name
      if target.is_dir():
        shutil.rmtree(target)
      elif target.exists():
        target.unlink()
  model = model_io.restore_model(model_dir)
  tok = _tokenizer_for(model_dir, checkpoint_arg, tokenizer)
  if isinstance(model, VideoMa2mba):
    llm, llm_params = model.llm, nnx.to_pure_dict(nnx.state(model.llm, nnx.Param))
  elif isinstance(model, Mamba2LM):
    llm, llm_params = model, nnx.to_pure_dict(nnx.state(model, nnx.Param))
  else:
    raise ValueError(f"{model_dir} holds a {type(model).__name__}; only VideoMa2mba and "
                     "Mamba2LM export to Hugging Face")
  ids = None
  if tok is not None:
    from ma2mba_jax.data.tokenizer import save_tokenizer, special_ids  # noqa: PLC0415
    ids = special_ids(tok, source=str(model_dir))
  lcfg = llm.config
  (out_path / LLM_DIR).mkdir(parents=True, exist_ok=True)
  _save(mamba2_ckpt.params_to_tensors(llm_params, lcfg, "hf"), out_path / LLM_DIR / WEIGHTS)
  eos = None if ids is None else ids.endoftext
  _write_json(out_path / LLM_DIR / "config.json",
              mamba2_ckpt.hf_config(lcfg, eos_token_id=eos, pad_token_id=eos,
                                    bos_token_id=eos))
  if tok is not None:
    save_tokenizer(tok, str(out_path / LLM_DIR))
  lines = [f"exported {model_dir} -> {out_path}",
           f"  {LLM_DIR}/: Mamba2ForCausalLM, {lcfg.n_layers} layers, d_model {lcfg.d_model}, "
           f"{lcfg.padded_vocab_size} embedding rows, tied {lcfg.tie_embeddings}"
           + ("" if tok is not None else " (no tokenizer found: none written)")]
  meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                          "model_class": model_io.qualified_name(type(model)),
                          "config": model_io.encode_config(model.config),
                          "llm": LLM_DIR}
  if ids is not None:
    import dataclasses  # noqa: PLC0415
    meta["special_token_ids"] = dataclasses.asdict(ids)
  if isinstance(model, VideoMa2mba):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    vcfg = model.vision.config
    (out_path / VISION_DIR).mkdir()
    _save({"vision_model." + k: v for k, v in
           vision_ckpt.to_hf_tensors(params["vision"], vcfg).items()},
          out_path / VISION_DIR / WEIGHTS)
    _write_json(out_path / VISION_DIR / "config.json", vision_ckpt.hf_config_from_vision(vcfg))
    _write_json(out_path / VISION_DIR / "preprocessor_config.json",
                vision_ckpt.preprocessor_config(vcfg))
    (out_path / PROJECTOR_DIR).mkdir()
    proj = projector_tensors(params["projector"])
    _save(proj, out_path / PROJECTOR_DIR / WEIGHTS)
    _write_json(out_path / PROJECTOR_DIR / "config.json", {
        "pooling": "bilinear, half-pixel centres, no antialias (torch F.interpolate "
                   "bilinear, align_corners=False) of the patch grid",
        "pool_factor": model.config.pool_factor,
        "vision_width": int(proj["fc1.weight"].shape[1]),
        "hidden_width": int(proj["fc1.weight"].shape[0]),
        "llm_width": int(proj["fc2.weight"].shape[0]),
        "activation": "gelu (exact, erf)",
        "forward": "fc2(gelu(fc1(pool(features))))"})
    kind = vision_ckpt.config_kind(vcfg)
    meta.update(vision=VISION_DIR, projector=PROJECTOR_DIR, vision_kind=kind,
                feature_layer=vcfg.feature_layer,
                drop_class_token=bool(vcfg.class_token),
                tokens_per_frame=model.config.tokens_per_frame,
                image_size=vcfg.image_size)
    lines += [f"  {VISION_DIR}/: {'CLIPVisionModel' if kind == 'clip' else 'SiglipVisionModel'}"
              f", {vcfg.n_layers} layers, width {vcfg.width}, features = hidden_states["
              f"{vcfg.feature_layer}]",
              f"  {PROJECTOR_DIR}/: pool x{model.config.pool_factor}, "
              f"{proj['fc1.weight'].shape[1]} -> {proj['fc1.weight'].shape[0]} -> "
              f"{proj['fc2.weight'].shape[0]}"]
  _write_json(out_path / EXPORT_FILE, meta)
  return "\n".join(lines)


def load_hf_export(out: str, **config_overrides) -> nnx.Module:
  """The model an `export_hf` folder holds (VideoMa2mba, or Mamba2LM for an LM-only
  export), read through the HF loaders; every part is checked against the recorded config
  (errors name the part's directory and what does not fit)."""
  out_path = Path(out)
  meta_path = out_path / EXPORT_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(f"{meta_path} not found: not a folder written by --export-hf")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r} version "
                     f"{meta.get('format_version')!r}; this code reads {FORMAT} "
                     f"{FORMAT_VERSION}")
  cls = model_io.import_trusted(meta["model_class"])
  config = model_io.decode_config(meta["config"])
  if config_overrides:
    import dataclasses  # noqa: PLC0415
    config = dataclasses.replace(config, **config_overrides)
  abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  llm_cfg = abstract.llm.config if cls is VideoMa2mba else abstract.config
  llm = mamba2_ckpt.llm_params(str(out_path / meta["llm"]), llm_cfg)
  if cls is VideoMa2mba:
    vision = vision_ckpt.vision_params(str(out_path / meta["vision"]), abstract.vision.config)
    proj_file = out_path / meta["projector"] / WEIGHTS
    proj = load_file(str(proj_file))
    abstract_proj = nnx.to_pure_dict(nnx.state(abstract.projector, nnx.Param))
    want = {f"{fc}.{kind}": (tuple(abstract_proj[fc]["kernel"].shape[::-1]) if kind == "weight"
                             else tuple(abstract_proj[fc]["bias"].shape))
            for fc in ("fc1", "fc2") for kind in ("weight", "bias")}
    bad = [f"{k}: expected shape {list(want[k])}, got "
           f"{list(proj[k].shape) if k in proj else 'missing'}"
           for k in want if k not in proj or tuple(proj[k].shape) != want[k]]
    bad += [f"unexpected {k}" for k in sorted(set(proj) - set(want))]
    if bad:
      raise vision_ckpt.CheckpointError(f"{proj_file}: " + "; ".join(bad))
    projector = {fc: {"kernel": np.asarray(proj[f"{fc}.weight"], np.float32).T,
                      "bias": np.asarray(proj[f"{fc}.bias"], np.float32)}
                 for fc in ("fc1", "fc2")}
    params = {"vision": vision, "projector": projector, "llm": llm}
  else:
    params = llm
  nnx.replace_by_pure_dict(state, _to_jax(params))
  return nnx.merge(graphdef, state)


def _to_jax(tree):
  if isinstance(tree, dict):
    return {k: _to_jax(v) for k, v in tree.items()}
  return jnp.asarray(tree)
