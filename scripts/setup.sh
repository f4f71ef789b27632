#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs ma2mba_jax with its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (skips a current install).
# Override the interpreter with PYTHON=/path/to/python3.12.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

is_new_enough() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c v
  if [ -n "${PYTHON:-}" ]; then
    is_new_enough "$PYTHON" && { echo "$PYTHON"; return; }
    echo "error: PYTHON=$PYTHON is not a Python >= 3.12" >&2; return 1
  fi
  for c in python3.14 python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null && is_new_enough "$c"; then command -v "$c"; return; fi
  done
  # pyenv: a 3.12+ version that is installed but not the active one.
  if command -v pyenv >/dev/null; then
    for v in $(pyenv versions --bare 2>/dev/null | sort -rV); do
      c="$(pyenv root)/versions/$v/bin/python"
      if [ -x "$c" ] && is_new_enough "$c"; then echo "$c"; return; fi
    done
  fi
  # uv-managed or conda interpreters are also fine if on PATH; nothing else to try.
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_new_enough .venv/bin/python; then
  py=$(find_python) || {
    echo "error: ma2mba_jax needs Python >= 3.12 and none was found (tried \$PYTHON, python3.14..python3, pyenv versions)." >&2
    echo "       Install one (e.g. 'pyenv install 3.12' or your package manager) or set PYTHON=/path/to/python3.12." >&2
    exit 1; }
  echo "[setup] creating .venv with $py ($("$py" --version 2>&1))"
  rm -rf .venv
  "$py" -m venv .venv
fi

# constraints.txt pins every package to the exact version the tests ran on (CI installs the
# same); a change to it, to pyproject.toml or to the extras reinstalls. MA2MBA_EXTRAS picks the
# extras (scripts/test.sh adds torch-tests).
extras=${MA2MBA_EXTRAS:-test,plot}
stamp=.venv/.ma2mba_installed_${extras//,/_}
want=$( (cat pyproject.toml constraints.txt; echo "$extras") | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing ma2mba_jax[$extras] and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
  echo "$want" > "$stamp"
fi
