#!/usr/bin/env bash
# Session 9, call f (nvidia-h100-x1): issue 19's decoding. The fused step now reads its
# matrices output-major (decode_weights(transposed=True)); fused_gemv has the rewritten
# Pallas GEMVs (kernels/decode/gemv.py). GPU tests first, then the 3.1B model's decoding
# (old path: the unrolled step, in the same process), then the 2.7B LM alone.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|warnings.warn\|^WARNING"
JAX_PLATFORMS=cuda,cpu timeout 85 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -4
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused,device_fused_gemv --decode_tokens=256 --repeats=3 \
  --json="$OUT/infer_decode.json" 2>&1 | $F | tail -3
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 --step_impls=unrolled,fused,fused_gemv \
  --loops=device --count_kernels= --repeats=3 --json="$OUT/decode_2.7b.json" 2>&1 | $F | tail -6
