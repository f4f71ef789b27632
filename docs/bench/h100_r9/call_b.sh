#!/usr/bin/env bash
# Session 9, call b (nvidia-h100-x1): issue 19's prefill, the old path (main at 091a996,
# exported to _base/) and the new one in the same call, same video lengths.
# 129,024 tokens = 896 frames = 28 steps of 32 (no remainder steps: the old bench's warm-up
# compiled only M and 1 frames); 131,072 tokens = 911 frames.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|warnings.warn"
echo "=== old path (091a996): XLA attention, shared conv window"
(cd _base && PYTHONPATH=/tmp/site:$PWD python -m ma2mba_jax.bench.infer --preset=3.1b \
  --lengths=129024 --frames_per_step=32 --decode_impls=device --decode_tokens=128 \
  --repeats=3 --json="$OUT/infer_old.json") 2>&1 | $F | tail -8
echo "=== new path: cuDNN attention (Streamer auto), per-tap conv windows"
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=129024,131072 --frames_per_step=32,64 \
  --decode_impls=device --decode_tokens=128 --vision_attention=auto,default --repeats=3 \
  --profile_dir=/tmp/prof --json="$OUT/infer_new.json" 2>&1 | $F | grep -v "^ *[0-9.]* us .*  0.[0-9]%" | tail -80
