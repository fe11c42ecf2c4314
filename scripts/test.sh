#!/usr/bin/env bash
# The test suite: set up if needed, then pytest (real-data tests read ../shared/data/camvid).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
