#!/usr/bin/env bash
# One GPU: train a stage with MA-GC, with the Python of the active environment ($PYTHON, else
# python3; e.g. `source .venv/bin/activate` first).
#   launch/single_gpu.sh configs/stage2.py:model=3.1b runs/stage2 [--config.init_from=runs/stage1 ...]
set -euo pipefail
config=${1:?config, e.g. configs/stage2.py:model=3.1b}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "${PYTHON:-python3}" -m ma2mba_jax.main --config="$config" --workdir="$workdir" "$@"
