"""Convert a pretrained Mamba-2 checkpoint into an Orbax checkpoint that training starts from.

    python -m ma2mba_jax.convert --src ~/models/mamba2-370m --out ~/ckpt/mamba2-370m
    python -m ma2mba_jax.convert --src DIR --out DIR --format hf --overwrite

--src is a local HF (`Mamba2ForCausalLM`) or state-spaces (mamba_ssm) directory; the result
is read back with `ma2mba_jax.convert.io.restore_model(out)` (the trainer's
`config.init_from`).
"""

from __future__ import annotations

from absl import app, flags

from ma2mba_jax.convert.io import save_model
from ma2mba_jax.convert.mamba2 import FORMATS, load_mamba2, read_config

_SRC = flags.DEFINE_string("src", None, "Checkpoint directory (config.json + weights).",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the Orbax checkpoint.",
                           required=True)
_FORMAT = flags.DEFINE_enum("format", "auto", FORMATS,
                            "Source layout; auto detects it from config.json.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Compute dtype recorded in the saved config.")
_SSD_IMPL = flags.DEFINE_string("ssd_impl", "auto", "SSD backend recorded in the saved config.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --out.")


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
  print(convert(_SRC.value, _OUT.value, fmt=_FORMAT.value, compute_dtype=_COMPUTE_DTYPE.value,
                ssd_impl=_SSD_IMPL.value, overwrite=_OVERWRITE.value))


if __name__ == "__main__":
  app.run(main)
