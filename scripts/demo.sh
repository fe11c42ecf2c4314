#!/usr/bin/env bash
# The main job on the embedded default backbone: set up if needed, then fit, segment and report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/unsupseg demo --out outputs/demo "$@"
