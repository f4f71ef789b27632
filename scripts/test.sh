#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the CPU test suite. GPU tests are skipped
# without a GPU. Extra arguments go to pytest, e.g. scripts/test.sh tests/kernels -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# --dist loadfile: a file's tests share one worker, so a module-scoped fixture (the 8-device
# subprocesses of tests/train, the trained tiny models of tests/infer) runs once, not once
# per worker.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
