#!/usr/bin/env bash
# Session 17, call e (nvidia-h100-x1): the same greedy tokens from the host loop and the
# device loop on the committed tree: (1) the GPU tests (small random models, every step,
# f32 and bf16); (2) the 3.1B model after a 131K-token video read with the default (Pallas
# SSD), the fused_mixed step in both loops (bench.infer's "same tokens" compares loops of
# the same step; in calls a-d each step ran in one loop only, so that column was vacuous).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|warnings.warn" | tail -${2:-3}; }
JAX_PLATFORMS=cuda,cpu timeout 150 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py \
  > $OUT/pytest_decode_gpu.txt 2>&1; tail -3 $OUT/pytest_decode_gpu.txt
timeout 200 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=64 \
  --decode_impls=host_fused_mixed,device_fused_mixed --decode_tokens=256 --repeats=1 \
  --json=$OUT/infer_e_same.json > $OUT/infer_e_same.txt 2>&1; g $OUT/infer_e_same.txt 3
python -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; print({k: r[k] for k in r if 'decode' in k or 'same' in k})" $OUT/infer_e_same.json
