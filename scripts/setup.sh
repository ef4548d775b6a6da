#!/usr/bin/env bash
# Install the locked stack into a virtual environment; quick and idempotent when nothing changed.
#   scripts/setup.sh [VENV]   (default .venv)
# The full install is recorded by the lock file's hash inside the venv, so a second run only checks it;
# the project itself is installed in editable mode, redone when the venv serves a different checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
lock=requirements.lock
key=$(sha256sum "$lock" | cut -c1-16)

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$venv/.lock-hash" 2>/dev/null)" != "$key" ]; then
  echo "setup: installing $lock into $venv (a full install takes about 5 minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$lock"
  echo "$key" > "$venv/.lock-hash"
  rm -f "$venv/.nucleiseg-src"
fi
if [ "$(cat "$venv/.nucleiseg-src" 2>/dev/null)" != "$PWD" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$PWD" > "$venv/.nucleiseg-src"
fi
echo "setup: $venv is ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
