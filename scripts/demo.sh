#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the built-in demo:
# synthetic long videos -> stage 1, 2, 3 training of the tiny model -> evaluation.
# Everything lands in ${WORKDIR:-runs/demo}. Measured on 2 CPU cores shared with other jobs:
# 17 and 26 minutes (2026-11-26). Running it again resumes where it stopped.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m ma2mba_jax.demo --workdir="${WORKDIR:-runs/demo}" "$@"
