#!/usr/bin/env bash
# Session 10, call a (nvidia-h100-x1): issue 19's decoding. GPU tests (fused_mixed's entry
# first run), the 2.7B LM's decode steps with a kernel profile (GPU busy vs gaps), the
# GEMVs against XLA's row-sum ceiling with each L2 eviction policy, and XLA's einsums with
# its Triton GEMM off (cuBLAS).
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
JAX_PLATFORMS=cuda,cpu timeout 100 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -2
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused,fused_gemv,fused_mixed --loops=device --count_kernels= \
  --repeats=3 --profile_dir=/tmp/dprof --json="$OUT/decode_2.7b_a.json" 2>&1 | $F | tail -75
python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=evict --profile_dir=/tmp/gprof \
  --json="$OUT/gemv_evict_a.json" 2>&1 | $F | grep -v "^\[" | tail -24
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m ma2mba_jax.bench.gemv --preset=2.7b \
  --sweep=evict --budget_s=1 --profile_dir=/tmp/gprof2 --json="$OUT/gemv_cublas_a.json" 2>&1 \
  | $F | grep -v "^\[" | grep "xla\|impl" | head -10
