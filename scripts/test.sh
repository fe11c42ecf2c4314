#!/usr/bin/env bash
# The test suite: set up if needed, then pytest (real-data tests read ../shared/data/camvid).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report is checked in a real headless browser (Debian's chromium); the test skips without it.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq chromium >/dev/null 2>&1 || true)
fi
exec .venv/bin/python -m pytest -q "$@"
