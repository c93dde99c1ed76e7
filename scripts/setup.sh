#!/usr/bin/env bash
# Create .venv and install lt2convert with its dev tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build on CPU machines.
.venv/bin/python -m pip install --quiet "torch==${LT2CONVERT_TORCH:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
