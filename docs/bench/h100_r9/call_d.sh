#!/usr/bin/env bash
# Session 9, call d (nvidia-h100-x1): issue 19's evaluation throughput with the 3.1B model
# after the text rest in power-of-two steps (same command as call c), then prefill memory
# from 16K to 2M tokens at M = 64 with the new path.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|warnings.warn"
python -m ma2mba_jax.bench.eval_throughput --model_preset=3.1b --dtype=bfloat16 \
  --param_dtype=bfloat16 --synthetic_dir=/tmp/synth --eval_videos=1 --step_frames=16 \
  --timed_runs=2 --ways=decode_batch,all_batched --json_out="$OUT/eval_3.1b.json" 2>&1 \
  | $F | tail -8
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384,2097152 --frames_per_step=64 \
  --decode_impls=device_fused --decode_tokens=64 --repeats=3 --json="$OUT/infer_2m.json" 2>&1 \
  | $F | tail -8
