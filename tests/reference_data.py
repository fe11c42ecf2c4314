"""The numbers computed by running the reference implementations (../shared/reference, see its README)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REFERENCE_DIR = Path(
    os.environ.get("UNSUPSEG_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


def load(name: str) -> dict[str, np.ndarray]:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not found (set UNSUPSEG_REFERENCE_DIR to the folder of the reference fixtures)")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
