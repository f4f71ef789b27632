#!/usr/bin/env bash
# Session 10, call f (nvidia-h100-x1): issue 19's decoding with the new defaults. GPU tests,
# then the 2.7B LM's steps (the old path, unrolled, in the same process), then the 3.1B
# model's decoding after a 16K-token video (bench.infer; device = the unrolled step).
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
JAX_PLATFORMS=cuda,cpu timeout 110 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -2
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused,fused_gemv,fused_mixed --loops=device --count_kernels= \
  --repeats=3 --profile_dir=/tmp/dprof --json="$OUT/decode_2.7b_f.json" 2>&1 | $F \
  | grep -v "^  *[0-9]\.[0-9] us" | tail -40
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --repeats=3 --json="$OUT/infer_3.1b_decode_f.json" 2>&1 | $F | tail -3
