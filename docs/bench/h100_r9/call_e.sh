#!/usr/bin/env bash
# Session 9, call e (nvidia-h100-x1): issue 19's evaluation throughput with the 3.1B model,
# which of the new path's parts change the answers (same set and command as calls c, d).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m ma2mba_jax.bench.eval_throughput --model_preset=3.1b --dtype=bfloat16 \
  --param_dtype=bfloat16 --synthetic_dir=/tmp/synth --eval_videos=1 --step_frames=16 \
  --timed_runs=2 --ways=decode_batch,all_batched,all_batched_xla_attention,all_batched_unrolled \
  --json_out="$OUT/eval_3.1b.json" 2>&1 | grep -v "^I1127\|^W1127\|warnings.warn\|^WARNING" \
  > "$OUT/eval_full.txt"
tail -9 "$OUT/eval_full.txt"
