"""Session 11 exploration (not a library entry point; call f): bench.decode with
models/decode._FOLD_OUT_PROJ set before anything is traced: the fused_reduce step's out_proj
as gemv.out_proj_folded (the mixer writes yw = g * w in cd, the gated norm's 1/rms applied
after the matmul) or as gemv.out_proj_then_norm (g in f32, the norm inside):
  python docs/bench/h100_r11/decode_fold.py fold|nofold [bench.decode flags].
The folded out_proj was faster (398.5 against 393.5 tok/s), so it became the only form and
the flag (and out_proj_then_norm) was removed after call f: on later commits both variants
run the folded step."""
import sys

from absl import app

from ma2mba_jax.bench import decode as bench_decode
from ma2mba_jax.models import decode

name = sys.argv.pop(1)
decode._FOLD_OUT_PROJ = name == "fold"
print(name, "_FOLD_OUT_PROJ", decode._FOLD_OUT_PROJ, flush=True)
sys.argv += [f"--label={name}"]
app.run(bench_decode.main)
