#!/usr/bin/env bash
# Session 9, call a (nvidia-h100-x1): issue 19's prefill and decode, with kernel profiles.
# Run from the repository root on the device after the wheels' install line.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=32,64 \
  --decode_impls=device,device_fused --decode_tokens=256 --vision_attention=default,cudnn \
  --profile_dir=/tmp/prof --repeats=3 --json="$OUT/infer_3.1b.json" 2>&1 \
  | grep -v "^I1127\|^W1127\|^  warnings.warn"
