"""Session 12 exploration (not a library entry point): bench.decode or bench.infer with the
decode mixer kernel's L2 prefetch of the layer's out_proj (pallas.PREFETCH_ROWS rows of its
[D, E] matrix, PREFETCH_ROWS_PER_PROGRAM rows a program; 0 rows: none) and the device
loop's tokens per while-loop iteration (sample.TOKENS_PER_ITERATION) and, from call f on,
in_proj's row padding of fused_reduce (sample.REDUCE_PAD, env PAD) patched before anything
is traced, one setting a process:
  [PAD=256] python docs/bench/h100_r12/prefetch.py decode|infer ROWS [PER_PROGRAM [TOKENS]]
      [flags]."""
import importlib
import os
import sys

from absl import app

from ma2mba_jax.infer import sample
from ma2mba_jax.kernels.decode import pallas

name = sys.argv.pop(1)
bench = importlib.import_module(f"ma2mba_jax.bench.{name}")   # one bench a process (flags)
pallas.PREFETCH_ROWS = int(sys.argv.pop(1))
if len(sys.argv) > 1 and sys.argv[1].isdigit():
  pallas.PREFETCH_ROWS_PER_PROGRAM = int(sys.argv.pop(1))
if len(sys.argv) > 1 and sys.argv[1].isdigit():
  sample.TOKENS_PER_ITERATION = int(sys.argv.pop(1))
sample.REDUCE_PAD = int(os.environ.get("PAD", sample.REDUCE_PAD))   # in_proj's row padding
label = (f"prefetch{pallas.PREFETCH_ROWS}x{pallas.PREFETCH_ROWS_PER_PROGRAM}"
         f"_k{sample.TOKENS_PER_ITERATION}_pad{sample.REDUCE_PAD}")
print(label, flush=True)
if name == "decode":
  sys.argv += [f"--label={label}"]
app.run(bench.main)
