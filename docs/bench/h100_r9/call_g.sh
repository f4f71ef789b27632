#!/usr/bin/env bash
# Session 9, call g (nvidia-h100-x1): the fused step (matrices output-major) with XLA's
# Triton GEMVs (default) and with cuBLAS (--xla_gpu_enable_triton_gemm=false), 2.7B LM.
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|warnings.warn\|^WARNING"
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=128 --step_impls=fused,fused_gemv \
  --loops=device --count_kernels= --repeats=3 --label=default 2>&1 | $F | tail -3
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m ma2mba_jax.bench.decode --preset=2.7b \
  --tokens=128 --step_impls=fused --loops=device --count_kernels= --repeats=3 \
  --label=cublas 2>&1 | $F | tail -2
