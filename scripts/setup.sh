#!/usr/bin/env bash
# Create .venv (Python 3.11) with unsupseg and its demo extras, once; later calls are no-ops until
# pyproject.toml changes. What only the tests need (test extras, chromium, pydensecrf2, datumaro) scripts/test.sh adds. torch and
# torchvision are pinned to the releases that install offline on the project machines; pip takes them from
# its local index there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.unsupseg-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[demo,leopart]"
echo "$want" > "$stamp"
