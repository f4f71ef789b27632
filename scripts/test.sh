#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the CPU test suite. GPU tests are skipped
# without a GPU. Extra arguments go to pytest, e.g. scripts/test.sh tests/kernels -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# torch and transformers (the extra torch-tests, ~5 GB: PyPI has only CUDA builds for Linux)
# let tests/convert compare against PyTorch; MA2MBA_TORCH_TESTS=0 skips them (they then skip).
if [ "${MA2MBA_TORCH_TESTS:-1}" != 0 ]; then export MA2MBA_EXTRAS=${MA2MBA_EXTRAS:-test,plot,torch-tests}; fi
"$root/scripts/setup.sh"
cd "$root"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# --dist loadfile: a file's tests share one worker, so a module-scoped fixture (the 8-device
# subprocesses of tests/train, the trained tiny models of tests/infer) runs once, not once
# per worker.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
