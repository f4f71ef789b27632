#!/usr/bin/env bash
# Session 17, call d (nvidia-h100-x1): issue 19's prefill and decode against the tree from
# before the issue (e182cb9, the commit before 486ddd3; `git archive e182cb9 | tar -x -C
# _base`, carried, not committed), in the same call: the issue's own command there (M = 16,
# host decode loop, frames made inside the prefill's clock as that bench did), then the
# committed default here (M = 64, Pallas SSD, fused_mixed decode; host_scan is the host loop
# before the issue, rerun in this tree). 129,024 tokens = 896 frames = 56 steps of 16 (the
# old bench's warm-up compiled only M and 1 frames, so a 911-frame video would compile its
# rest steps inside the clock there); 131,072 -> 911 frames, as the issue measured.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.mem --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|warnings.warn" | tail -${2:-3}; }
echo "=== before issue 19 (e182cb9)"
(cd _base && PYTHONPATH=/tmp/site:$PWD timeout 200 python -m ma2mba_jax.bench.infer --preset=3.1b \
  --lengths=129024,131072 --decode_tokens=256 --repeats=3 --json="$OUT/infer_d_old.json") \
  > $OUT/infer_d_old.txt 2>&1; g $OUT/infer_d_old.txt 8
echo "=== now (default)"
timeout 260 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=129024,131072 \
  --frames_per_step=64 --decode_impls=host_scan,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_d_new.json > $OUT/infer_d_new.txt 2>&1
g $OUT/infer_d_new.txt 8
