"""The k-means baseline on real CamVid: the floor every method must beat (issue: pAcc >= 50, mIoU >= 28)."""

import pytest

import unsupseg


@pytest.mark.slow
def test_kmeans_baseline_on_camvid(camvid_root, shared_cache, tmp_path):
    messages = []
    unsupseg.fit("kmeans", dataset="camvid", root=camvid_root, out=tmp_path / "run",
                 overrides=[f"cache_dir={shared_cache}"], log=messages.append)
    report = unsupseg.evaluate(tmp_path / "run", dataset="camvid", root=camvid_root, split="val", flip=False,
                               json_path=tmp_path / "scores.json")
    assert report["n_images"] == 101
    assert report["pixel_accuracy"] >= 50
    assert report["miou"] >= 28
    assert set(report) >= {"pixel_accuracy", "miou", "per_class_iou", "n_images"}
