"""Session 11 exploration (not a library entry point; call d): bench.decode with
gemv.SSQ_COPIES (out_proj_then_norm's copies of its partial sums of squares, which every
program of the next mixer kernel summed, one copy per program) set before anything is
traced:  python docs/bench/h100_r11/decode_copies.py COPIES [bench.decode flags].
Copies made the step slower (388.2 / 380.0 / 379.3 tok/s for 1 / 16 / 64), so the option
was removed after call d; on later commits this script no longer changes anything."""
import sys

from absl import app

from ma2mba_jax.bench import decode
from ma2mba_jax.kernels.decode import gemv

copies = int(sys.argv.pop(1))
gemv.SSQ_COPIES = copies
print("SSQ_COPIES", copies, flush=True)
sys.argv += [f"--label=copies{copies}"]
app.run(decode.main)
