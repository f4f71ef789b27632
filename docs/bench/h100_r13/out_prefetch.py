"""Session 13 exploration (not a library entry point): out_proj_folded's L2 prefetch of the
next layer's in_proj (gemv.OUT_PROJ_PREFETCH_ROWS rows; 0: none), 3.1B model, fused_mixed.
Needs out_proj_prefetch.patch (applied in call d only and not committed: slower).
  sweep ROWS...   one process: for each count, a new Sampler (the kernels retraced), greedy
                  answers of 256 and 1024 tokens from zero states (median of 3 each); writes
                  the fastest count at 1024 tokens to $OUT/best.txt.
  infer ROWS [bench.infer flags]   bench.infer with that count patched in."""
import os
import statistics
import sys

from ma2mba_jax.kernels.decode import gemv

mode = sys.argv.pop(1)
if mode == "infer":
  from absl import app

  from ma2mba_jax.bench import infer as bench_infer
  gemv.OUT_PROJ_PREFETCH_ROWS = int(sys.argv.pop(1))
  print(f"OUT_PROJ_PREFETCH_ROWS={gemv.OUT_PROJ_PREFETCH_ROWS}", flush=True)
  app.run(bench_infer.main)
  sys.exit()

import jax

from ma2mba_jax.bench import infer as bench_infer
from ma2mba_jax.data.template import SYSTEM_PROMPT
from ma2mba_jax.data.tokenizer import train_tokenizer, vocab_size
from ma2mba_jax.infer.sample import Sampler

from after_prefill import median_seconds   # this folder's script (its directory is on the path)

tokenizer = train_tokenizer([SYSTEM_PROMPT, bench_infer.QUESTION], vocab_size=300)
model = bench_infer.build_model("3.1b", "bfloat16", "bfloat16", "auto", vocab_size(tokenizer))
zero = model.llm.init_states(1)
logits = jax.random.normal(jax.random.key(1), (model.llm.config.padded_vocab_size,))
rates = {}
sampler = None
for rows in map(int, sys.argv[1:]):
  gemv.OUT_PROJ_PREFETCH_ROWS = rows
  gemv.out_proj_folded.clear_cache()   # its default is read at trace time
  del sampler
  sampler = Sampler(model.llm, vocab_size=vocab_size(tokenizer), step_impl="fused_mixed")
  row = {n: n / median_seconds(sampler, zero, logits, n) for n in (256, 1024)}
  rates.setdefault(rows, []).append(row[1024])
  print(f"prefetch {rows:5d} rows: 256 tok {row[256]:6.1f} tok/s, 1024 tok {row[1024]:6.1f} "
        f"tok/s", flush=True)
best = max(rates, key=lambda r: statistics.mean(rates[r]))
print(f"best: {best} rows ({statistics.mean(rates[best]):.1f} tok/s at 1024 tokens)")
with open(os.path.join(os.environ.get("OUT", "/tmp"), "best.txt"), "w") as f:
  f.write(str(best))
