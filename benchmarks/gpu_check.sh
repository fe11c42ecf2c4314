#!/usr/bin/env bash
# GPU check for a lent machine (under 8 minutes on one GPU): backbone, feature extraction, segment,
# CAUSE-TR Step 2 and CRF throughput, peak GPU memory. Random weights, synthetic images: nothing is
# downloaded beyond the Python packages the project needs.
#
#   bash benchmarks/gpu_check.sh                   # the check, on the GPU
#   bash benchmarks/gpu_check.sh --quick           # toy sizes: a smoke test on any machine
#   bash benchmarks/gpu_check.sh --json out.json   # also write the figures as JSON
#
# Python: $PYTHON, else python3. If it already has the project's dependencies (e.g. a machine whose
# python3 holds a CUDA build of torch), this checkout runs as is; otherwise `pip install -e .` adds
# them around the torch that is there, and failing that scripts/setup.sh makes .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
deps="import torch, torchvision, timm, numpy, scipy, PIL, typer, rich, safetensors, yaml, matplotlib"
if "$py" -c "$deps" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "$deps; import unsupseg" 2>/dev/null; then
    py=.venv/bin/python
elif "$py" -m pip install -q -e .; then
    :
else
    bash scripts/setup.sh
    py=.venv/bin/python
fi
exec "$py" benchmarks/gpu_check.py "$@"
