#!/usr/bin/env bash
# Several GPUs of one host: one process drives them all (Python: $PYTHON, else python3).
# The batch is split over every GPU; the layout is config.mesh (train/sharding.py):
#   data parallel (default)       parameters and optimizer state on every GPU
#   --config.mesh.zero1=True      ZeRO-1, the paper's: optimizer state split over the GPUs
#   --config.mesh.fsdp=N          FSDP: parameters and optimizer state split over N GPUs
#   launch/multi_gpu.sh configs/stage2.py:model=3.1b runs/stage2 --config.mesh.zero1=True
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "${PYTHON:-python3}" -m ma2mba_jax.main --config="$config" --workdir="$workdir" "$@"
