#!/usr/bin/env bash
# Several GPUs of one host: one process drives them all; the batch is split over the mesh's
# data axis (add --config.mesh.fsdp=N to shard parameters and optimizer state over N GPUs).
#   launch/multi_gpu.sh configs/stage2.py:model=3.1b runs/stage2 --config.mesh.fsdp=8
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec .venv/bin/python -m ma2mba_jax.main --config="$config" --workdir="$workdir" "$@"
