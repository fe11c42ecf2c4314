"""Small file writers shared by the data tests (images and labels built in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
CAMVID_ROOT = (REPO_ROOT / ".." / "shared" / "data" / "camvid").resolve()


def _write_rgb(path: Path, height: int = 6, width: int = 8, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _write_label(path: Path, values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(values)
    Image.fromarray(array.astype(np.uint8) if array.dtype != np.uint16 else array).save(path)
    return path


@pytest.fixture
def write_rgb():
    """write_rgb(path, height=6, width=8, seed=0) -> path: a random RGB image file."""
    return _write_rgb


@pytest.fixture
def write_label():
    """write_label(path, 2-D values) -> path: an 8-bit (or 16-bit for uint16) label PNG."""
    return _write_label


@pytest.fixture
def camvid_root() -> Path:
    if not (CAMVID_ROOT / "train").is_dir():
        pytest.skip(f"real CamVid data not found at {CAMVID_ROOT} (see shared/data/camvid/README.md)")
    return CAMVID_ROOT
