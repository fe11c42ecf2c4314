import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ci_skips import pytest_runtest_makereport  # noqa: F401  (a hook: CI turns some skips into failures)

# progress bars off in tests; every test gets its own feature cache unless it asks for the shared one
os.environ.setdefault("UNSUPSEG_PROGRESS", "0")

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNSUPSEG_CACHE_DIR", str(tmp_path / "feature-cache"))


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    if not (CAMVID / "train").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (expected ../shared/data/camvid beside the repository)")
    return CAMVID


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One feature cache for the real-data tests of the whole session (CamVid is extracted once)."""
    return tmp_path_factory.mktemp("camvid-feature-cache")


def write_images(folder: Path, n: int, size=(64, 48), seed: int = 0) -> list[Path]:
    """Synthetic photos: two colour regions with noise, so features have structure."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        img = np.zeros((h, w, 3), dtype=np.float32)
        split = rng.integers(w // 4, 3 * w // 4)
        img[:, :split] = rng.uniform(0, 1, 3)
        img[:, split:] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.05, img.shape)
        path = folder / f"img_{i:02d}.png"
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def one_thread():
    """Tiny tensors: an OpenMP thread team costs more than it saves, most of all on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
