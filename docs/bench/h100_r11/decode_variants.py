"""Session 11 exploration (not a library entry point; call g): bench.decode's fused_reduce
step with out_proj_folded's launch config (gemv.DEFAULTS["out_proj", "vec"]) and the mixer
kernel's split / warps (pallas.SPLIT, pallas.NUM_WARPS) patched before anything is traced,
one variant a process:  python docs/bench/h100_r11/decode_variants.py VARIANT [flags]."""
import sys

from absl import app

from ma2mba_jax.bench import decode
from ma2mba_jax.kernels.decode import gemv, pallas

# name: (out_proj vec config changes, mixer split, mixer warps)
VARIANTS = {
    "current": (dict(), 4, 2),
    "out_bn8": (dict(block_n=8), 4, 2),
    "out_bk512": (dict(block_k=512), 4, 2),
    "out_bn2_w2": (dict(block_n=2, num_warps=2), 4, 2),
    "out_noahead": (dict(ahead=False), 4, 2),
    "out_w8_bk2048": (dict(num_warps=8, block_k=2048), 4, 2),
    "mixer_s8w2": (dict(), 8, 2),
    "mixer_s8w1": (dict(), 8, 1),
    "mixer_s2w4": (dict(), 2, 4),
}

name = sys.argv.pop(1)
change, pallas.SPLIT, pallas.NUM_WARPS = VARIANTS[name]
key = ("out_proj", "vec")
gemv.DEFAULTS[key] = gemv.DEFAULTS[key]._replace(**change)
print(name, gemv.DEFAULTS[key], "split", pallas.SPLIT, "warps", pallas.NUM_WARPS, flush=True)
sys.argv += [f"--label={name}"]
app.run(decode.main)
