#!/usr/bin/env bash
# Set up, fetch the offline real-model assets, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium for the report's browser test (the test skips without it). Idempotent, best effort.
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
            >/dev/null 2>&1 || echo "warning: apt-get could not install chromium; the report's browser test will skip" >&2
    else
        echo "warning: no chromium and no apt-get; the report's browser test will skip" >&2
    fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LT2CONVERT_REQUIRE_ASSETS=1
.venv/bin/lt2convert fetch-asset smollm2-135m
.venv/bin/lt2convert fetch-asset shakespeare
.venv/bin/lt2convert fetch-asset austen
.venv/bin/lt2convert fetch-asset jargon
.venv/bin/lt2convert fetch-asset devils-dictionary
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
