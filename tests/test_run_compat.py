"""Run directories written by an earlier release (a73e04d, before the api package and the method
registry) still load and predict exactly what that release predicted.

tests/fixtures/old_runs holds tiny runs fitted then on six synthetic photos (efficientnet_lite0,
K = 3) and, per method, the labels that release's ``Segmenter.predict`` gave two other photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import unsupseg

OLD = Path(__file__).parent / "fixtures" / "old_runs"


@pytest.mark.parametrize("method", ["kmeans", "stego", "cause-mlp"])
def test_a_run_of_the_earlier_layout_predicts_as_it_did(tmp_path, method):
    run = shutil.copytree(OLD / "runs" / method, tmp_path / method)   # loading may add to meta.json
    seg = unsupseg.load(run)
    assert seg.config.method == method and seg.num_clusters == 3
    for photo in sorted((OLD / "photos").glob("*.png")):
        expected = np.load(OLD / f"{method}_{photo.stem}.npy")
        np.testing.assert_array_equal(seg.predict(photo), expected)
