"""Convert a pretrained Mamba-2 checkpoint into an Orbax checkpoint that training starts
from, or export a trained model to Hugging Face files.

    python -m ma2mba_jax.convert --src ~/models/mamba2-370m --out ~/ckpt/mamba2-370m
    python -m ma2mba_jax.convert --src DIR --out DIR --format hf --overwrite
    python -m ma2mba_jax.convert --export-hf runs/stage3 --out exports/video-ma2mba

--src is a local HF (`Mamba2ForCausalLM`) or state-spaces (mamba_ssm) directory; the result
is read back with `ma2mba_jax.convert.io.restore_model(out)` (the trainer's
`config.init_from`). The trainer can also read such directories itself, and HF CLIP /
SigLIP vision directories: config.model.llm_init / config.model.vision_init.

--export-hf is a trainer workdir or a model export; --out receives llm/ (Mamba2ForCausalLM
+ tokenizer), vision/ (CLIPVisionModel or SiglipVisionModel), projector/ and
ma2mba_export.json (see convert/export_hf.py).
"""

from __future__ import annotations

import sys

from absl import app, flags

from ma2mba_jax.convert.io import save_model
from ma2mba_jax.convert.mamba2 import FORMATS, load_mamba2, read_config

_SRC = flags.DEFINE_string("src", None, "Checkpoint directory (config.json + weights) to "
                           "convert into an Orbax checkpoint.")
_EXPORT_HF = flags.DEFINE_string("export-hf", None, "Trainer workdir or model export to "
                                 "write as Hugging Face safetensors + config.json.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", "auto", FORMATS,
                            "Source layout of --src; auto detects it from config.json.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Compute dtype recorded in the saved config (--src).")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "auto", "SSD backend recorded in the saved "
                                "config (--src).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "With --export-hf: tokenizer.json to "
                                 "write (default: the one saved with the model).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output in --out.")


def convert(src: str, out: str, *, fmt: str = "auto", compute_dtype: str = "float32",
            ssd_impl: str = "auto", overwrite: bool = False) -> str:
  """Converts src into out; returns a human-readable summary of what was done."""
  _, layout = read_config(src, fmt)
  model = load_mamba2(src, format=layout, compute_dtype=compute_dtype, ssd_impl=ssd_impl)
  out_dir = save_model(model, out, overwrite=overwrite)
  c = model.config
  return "\n".join([
      f"converted {src} ({layout} layout) -> {out_dir}",
      f"  params: {model.num_params():,}",
      f"  layers {c.n_layers}, d_model {c.d_model}, d_state {c.d_state}, head_dim "
      f"{c.head_dim}, heads {c.n_heads}, groups {c.n_groups}, d_conv {c.d_conv}, "
      f"vocab {c.vocab_size} (padded {c.padded_vocab_size}), tied {c.tie_embeddings}",
      f"  config: {c}",
  ])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_SRC.value is None) == (_EXPORT_HF.value is None):
    raise app.UsageError("give exactly one of --src (import a Mamba-2 checkpoint) and "
                         "--export-hf (export a trained model)")
  try:
    if _EXPORT_HF.value is not None:
      from ma2mba_jax.convert.export_hf import export_hf  # noqa: PLC0415
      print(export_hf(_EXPORT_HF.value, _OUT.value, tokenizer=_TOKENIZER.value,
                      overwrite=_OVERWRITE.value))
    else:
      print(convert(_SRC.value, _OUT.value, fmt=_FORMAT.value,
                    compute_dtype=_COMPUTE_DTYPE.value, ssd_impl=_SSD_IMPL.value,
                    overwrite=_OVERWRITE.value))
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # bad input: names it
    sys.exit(f"convert: error: {e}")


if __name__ == "__main__":
  app.run(main)
