#!/usr/bin/env bash
# Create .venv and install lt2convert with its dev tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# -qq: errors only (pip's warnings about the machine's own index configuration are not ours to print).
PIP=(.venv/bin/python -m pip install -qq)
"${PIP[@]}" --upgrade pip
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build on CPU machines.
"${PIP[@]}" "torch==${LT2CONVERT_TORCH:-2.13.0}"
# setuptools' build backend warns about every editable install (a generic notice, not a problem here).
PYTHONWARNINGS=ignore "${PIP[@]}" -e ".[dev]"
