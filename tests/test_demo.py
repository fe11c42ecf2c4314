"""The README's first command: the demo fits the flagship CAUSE-MLP on scikit-image's photos."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unsupseg
from unsupseg import rundir
from unsupseg.demo import MIN_PARTS, PHOTOS, bundled_photos, parts, run_demo

pytest.importorskip("skimage")


def test_parts_counts_clusters_covering_a_tenth_by_hand():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[:, :1] = 1                                  # 10 %: a part
    mask[0, 1:10] = 2                                # 9 %: not a part
    assert parts(mask, 3) == 2
    assert parts(np.zeros((4, 4), dtype=np.uint8), 5) == 1


def test_centred_features_split_every_photo_with_five_clusters(tmp_path):
    # Six unrelated photos, K = 5: clustered as they are, the clusters find the photos (some come out in
    # one colour); with each photo's mean feature subtracted, they find parts within every photo.
    (tmp_path / "images").mkdir()
    photos = [Path(shutil.copy(p, tmp_path / "images")) for p in bundled_photos()]
    counts = {}
    for center in (False, True):
        seg = unsupseg.fit("kmeans", images=tmp_path / "images", out=tmp_path / f"run-{center}", clusters=5,
                           backbone="efficientnet_lite0", preset="demo", log=lambda m: None,
                           overrides=[f"backbone.options.center={str(center).lower()}",
                                      f"cache_dir={tmp_path / 'cache'}"])
        counts[center] = [parts(seg.predict(Image.open(p).convert("RGB")), 5) for p in photos]
    assert min(counts[False]) == 1, counts          # what the option is for
    assert min(counts[True]) >= MIN_PARTS, counts


@pytest.mark.slow
def test_demo_fits_cause_and_splits_every_photo_into_parts(tmp_path):
    table = run_demo(tmp_path, "cause-mlp", "auto", overwrite=False, log=lambda m: None)
    run = rundir.load(tmp_path / "run-cause-mlp")
    assert run.config.method == "cause-mlp" and run.config.backbone.name == "efficientnet_lite0"
    assert run.config.params["cluster_loss"] == "cosine"          # the demo preset, not the paper default
    k = run.config.clusters
    assert run.state["cluster_probe"].shape == (k, 90)
    used = set()
    for name in PHOTOS:
        stem = name.rsplit(".", 1)[0]
        photo = Image.open(tmp_path / "images" / name)
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{stem}.png"))
        assert mask.shape == (photo.height, photo.width) and mask.max() < k
        assert Image.open(tmp_path / "masks" / f"{stem}_overlay.jpg").size == photo.size
        # the photo is split into its parts, not painted in one colour
        assert parts(mask, k) >= MIN_PARTS, name
        used |= set(np.unique(mask).tolist())
    assert len(used) >= 3                                            # it discovers several categories
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/") >= len(PHOTOS)                   # self-contained: images inlined
    assert table.row_count == len(PHOTOS) + 1
