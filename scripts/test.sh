#!/usr/bin/env bash
# The test suite: set up if needed, install what only the tests use, lint, then pytest (real-data tests
# read ../shared/data/camvid), listing the 20 slowest tests. Under CI=true a skipped browser, CamVid or
# CRF-reference test is a failure (tests/ci_skips.py), so an install that fails here fails the run there
# instead of passing silently.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ci=${CI:-false}
# Test-only packages: pytest, the linter, the export formats' own readers, the larger embedded backbones.
stamp=.venv/.unsupseg-test
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q -e ".[dev,export,lite12]"
    echo "$want" > "$stamp"
fi
# Datumaro reads the CVAT export back; its pins (Pillow) conflict with ours, so it gets an environment of its own.
if [ ! -x .venv-datumaro/bin/python ]; then
    ("${PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv .venv-datumaro \
        && .venv-datumaro/bin/python -m pip install -q datumaro) \
        || { rm -rf .venv-datumaro; echo "warning: datumaro did not install; the CVAT read-back test will skip" >&2
             [ "$ci" != true ]; }
fi
export UNSUPSEG_DATUMARO_PYTHON=$PWD/.venv-datumaro/bin/python
# The HTML report is checked in a real headless browser (Debian's chromium). A fresh machine has no
# package index yet: fetch it first.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || { echo "warning: chromium did not install; the browser test will skip" >&2; [ "$ci" != true ]; }
fi
# The reference CRF backend (pydensecrf2) compiles C++; only the CRF agreement tests use it.
if ! .venv/bin/python -c "import pydensecrf" 2>/dev/null; then
    .venv/bin/python -m pip install -q -e ".[crf-reference]" \
        || { echo "warning: pydensecrf2 did not install; CRF agreement tests will skip" >&2; [ "$ci" != true ]; }
fi
# Locally the `slow` tests (real data, whole pipelines) are left out; CI runs everything. A -m of your own
# comes later on the command line and wins: scripts/test.sh -m slow runs only them.
select=()
[ "$ci" = true ] || select=(-m "not slow")
.venv/bin/ruff check
exec .venv/bin/python -m pytest -q --durations=20 "${select[@]}" "$@"
