"""Session 10 exploration (not a library entry point): bench.decode's fused_gemv step with
the GEMV and mixer kernels' launch settings patched before anything is traced, one variant
per process:  python docs/bench/h100_r10/decode_variants.py VARIANT [bench.decode flags].
Calls b-e ran it at commit 41b620e; the mixer's touch option (pallas.TOUCH) was removed
after call e (it moved time from out_proj into the mixer kernel, no net gain), so on later
commits the touch fraction has no effect."""
import sys

from absl import app

from ma2mba_jax.bench import decode
from ma2mba_jax.kernels.decode import gemv, pallas

EA = dict(eviction="evict_first", ahead=True, num_warps=4, num_stages=1)
P528 = dict(eviction="evict_first", num_warps=4, num_stages=1, programs=528)
# name: (in_proj change, out_proj change, mixer split, mixer touch fraction[, mixer warps])
VARIANTS = {
    "v0_current": (dict(), dict(), 1, 0.0),
    "v1_evict_ahead": (EA, EA, 1, 0.0),
    "v2_evict_ahead_split2": (EA, EA, 2, 0.0),
    "v3_evict_ahead_split4": (EA, EA, 4, 0.0),
    "v4_evict": (dict(EA, ahead=False), dict(EA, ahead=False), 2, 0.0),
    "v5_persistent264": (dict(P528, programs=264), dict(P528, programs=264), 2, 0.0),
    "v6_persistent528": (P528, P528, 2, 0.0),
    "v7_persistent1056": (dict(P528, programs=1056), dict(P528, programs=1056), 2, 0.0),
    "v8_touch50": (EA, EA, 2, 0.5),
    "v9_touch100": (EA, EA, 2, 1.0),
    "v10_touch25": (EA, EA, 2, 0.25),
    "v11_p528in_touch50": (P528, EA, 2, 0.5),
    "v12_touch50_outk512": (EA, dict(EA, block_k=512), 2, 0.5),
    "va_p528_s2_t25": (P528, EA, 2, 0.25),
    "vb_p528_s8w4_t25": (P528, EA, 8, 0.25, 4),
    "vc_p528_s4w2_t0": (P528, EA, 4, 0.0, 2),
    "vd_p528_s4w2_t25": (P528, EA, 4, 0.25, 2),
}

name = sys.argv.pop(1)
in_change, out_change, split, touch, *warps = VARIANTS[name]
for kernel, change in (("in_proj", in_change), ("out_proj", out_change)):
  gemv.DEFAULTS[(kernel, "vec")] = gemv.DEFAULTS[(kernel, "vec")]._replace(**change)
pallas.SPLIT = split
pallas.TOUCH = touch
pallas.NUM_WARPS = warps[0] if warps else pallas.NUM_WARPS
print(name, {k: v for k, v in gemv.DEFAULTS.items() if k[1] == "vec"}, "split", split,
      "touch", touch)
sys.argv += [f"--label={name}"]
app.run(decode.main)
