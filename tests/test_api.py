"""End-to-end behaviour of the public API and CLI with the k-means baseline on synthetic photos."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import unsupseg
from tests.conftest import write_images
from unsupseg import rundir
from unsupseg.errors import RunDirError

OVERRIDES = ["data.resolution=48", "params.restarts=1"]


def fit_args(tmp):
    # the cache lives with the module's files so the second fit can hit it
    return dict(method="kmeans", backbone="efficientnet_lite0", clusters=3,
                overrides=OVERRIDES + [f"cache_dir={tmp / 'cache'}"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    write_images(tmp / "imgs", 4)
    messages = []
    seg = unsupseg.fit(images=tmp / "imgs", out=tmp / "run", log=messages.append, **fit_args(tmp))
    return tmp, seg, messages


def test_fit_writes_a_complete_run_directory(fitted):
    tmp, seg, messages = fitted
    for name in ("config.yaml", "weights.safetensors", "meta.json"):
        assert (tmp / "run" / name).exists()
    assert not (tmp / "run" / "checkpoints").exists()
    meta = json.loads((tmp / "run" / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["train_data"]["images"] == 4
    assert any("cache miss" in m for m in messages)
    loaded = unsupseg.load(tmp / "run")
    assert loaded.num_clusters == 3


def test_second_identical_fit_hits_the_cache_and_refuses_to_overwrite(fitted):
    tmp, _, _ = fitted
    with pytest.raises(RunDirError, match="--overwrite"):
        unsupseg.fit(images=tmp / "imgs", out=tmp / "run", log=lambda m: None, **fit_args(tmp))
    messages = []
    unsupseg.fit(images=tmp / "imgs", out=tmp / "run", overwrite=True, log=messages.append, **fit_args(tmp))
    assert any("cache hit" in m and "backbone skipped" in m for m in messages)


def test_predict_returns_labels_at_the_displayed_size(fitted, tmp_path):
    _, seg, _ = fitted
    for size in [(64, 48), (50, 37), (200, 90)]:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        labels = seg.predict(image)
        assert labels.shape == (size[1], size[0])
        assert labels.min() >= 0 and labels.max() < 3


def test_segment_writes_masks_and_overlays_and_skips_done(fitted, tmp_path):
    tmp, _, _ = fitted
    out = tmp_path / "out"
    written = unsupseg.segment(tmp / "run", [tmp / "imgs"], out)
    assert len(written) == 4
    mask = Image.open(out / "img_00.png")
    assert mask.mode == "L" and mask.size == (64, 48)
    assert Image.open(out / "img_00_overlay.jpg").size == (64, 48)
    assert unsupseg.segment(tmp / "run", [tmp / "imgs"], out) == []          # already done
    assert len(unsupseg.segment(tmp / "run", [tmp / "imgs"], out, overwrite=True)) == 4
    assert not list(out.glob(".*.tmp"))


def test_tampered_or_foreign_runs_are_refused(fitted, tmp_path):
    tmp, _, _ = fitted
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tmp / "run", copy)
    with open(copy / "weights.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(RunDirError, match="checksum"):
        rundir.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(tmp / "run", copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["config_version"] = 99
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match="format 99"):
        rundir.load(copy)


def test_cli_prints_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unsupseg.cli", "fit", "--method", "kmeans", "--images", str(tmp_path / "missing"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "missing" in result.stderr and "Traceback" not in result.stderr
