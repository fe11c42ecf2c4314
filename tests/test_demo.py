"""The README's first command: the demo fits the flagship CAUSE-MLP on scikit-image's photos."""

import numpy as np
import pytest
from PIL import Image

from unsupseg import rundir
from unsupseg.demo import PHOTOS, run_demo

pytest.importorskip("skimage")


@pytest.mark.slow
def test_demo_fits_cause_and_writes_masks_overlays_and_report(tmp_path):
    table = run_demo(tmp_path, "cause-mlp", 5, overwrite=False, log=lambda m: None)
    run = rundir.load(tmp_path / "run-cause-mlp")
    assert run.config.method == "cause-mlp" and run.config.backbone.name == "efficientnet_lite0"
    assert run.config.params["cluster_loss"] == "cosine"          # the demo preset, not the paper default
    assert run.state["cluster_probe"].shape == (5, 90)
    used = set()
    for name in PHOTOS:
        stem = name.rsplit(".", 1)[0]
        photo = Image.open(tmp_path / "images" / name)
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{stem}.png"))
        assert mask.shape == (photo.height, photo.width) and mask.max() < 5
        assert Image.open(tmp_path / "masks" / f"{stem}_overlay.jpg").size == photo.size
        used |= set(np.unique(mask).tolist())
    assert len(used) >= 3                                            # it discovers several categories
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/") >= len(PHOTOS)                   # self-contained: images inlined
    assert table.row_count == len(PHOTOS) + 1
