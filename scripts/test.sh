#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the CPU test suite. GPU tests are skipped
# without a GPU. Extra arguments go to pytest, e.g. scripts/test.sh tests/kernels -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
