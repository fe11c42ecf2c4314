"""Leopart's over-clustering protocol: PCA + k-means + many-to-one matching, mean/std over seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unsupseg.errors import ConfigError
from unsupseg.evaluation.metrics import majority_mapping, score
from unsupseg.evaluation.overcluster import overcluster_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(n=4, classes=3, dim=8, side=8, seed=0):
    """Feature maps whose tokens sit near one of 2 * classes centres (two "parts" per class) and labels
    at twice the token resolution."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(2 * classes, dim, generator=gen) * 5
    features, labels = [], []
    for _ in range(n):
        parts = torch.randint(0, 2 * classes, (side, side), generator=gen)
        feats = centres[parts].permute(2, 0, 1) + 0.05 * torch.randn(dim, side, side, generator=gen)
        features.append(feats.half())
        label = (parts // 2).repeat_interleave(2, 0).repeat_interleave(2, 1)
        labels.append(label)
    return features, labels


def test_parts_of_classes_score_perfectly():
    features, labels = _blocks()
    # k well above the 6 parts: faiss-style random initial centroids then cover every part
    result = overcluster_scores(features, labels, 3, k=24, seeds=(0, 1), pca_dim=4, restarts=3)
    assert result["miou"] == pytest.approx(100.0) and result["miou_std"] == pytest.approx(0.0)
    assert result["matching"] == "many-to-one" and result["k"] == 24 and len(result["per_seed"]) == 2
    assert result["pixel_accuracy"] == pytest.approx(100.0)


def test_ignored_pixels_never_count_and_size_option():
    features, labels = _blocks(seed=1)
    noisy = [lab.clone() for lab in labels]
    for lab in noisy:
        lab[:3] = -1                       # ignore some rows: nothing changes
    a = overcluster_scores(features, noisy, 3, k=24, seeds=(0,), pca_dim=4, restarts=3)
    assert a["miou"] == pytest.approx(100.0)
    # wrong labels at pixels that the nearest resize to 5 x 5 skips (it samples rows/cols 0, 3, 6, 9, 12)
    wrong = [lab.clone() for lab in labels]
    for lab in wrong:
        lab[1, 1] = (lab[1, 1] + 1) % 3
    assert overcluster_scores(features, wrong, 3, k=24, seeds=(0,), pca_dim=4, restarts=3)["miou"] < 100
    b = overcluster_scores(features, wrong, 3, k=24, seeds=(0,), pca_dim=4, restarts=3, size=5)
    assert b["miou"] == pytest.approx(100.0)


def test_k_equal_classes_uses_hungarian():
    features, labels = _blocks(seed=2)
    result = overcluster_scores(features, labels, 3, k=3, seeds=(0,), pca_dim=4, restarts=2)
    assert result["matching"] == "hungarian" and result["miou"] <= 100.0


def test_many_to_one_is_the_majority_vote():
    matrix = np.array([[5, 2, 0], [1, 1, 3], [0, 4, 4], [7, 0, 1]])
    assert majority_mapping(matrix).tolist() == [0, 2, 1, 0]     # a tie goes to the lowest class
    # a refinement of the ground truth (each cluster inside one class) scores 100, and so does a permuted GT
    refinement = np.array([[4, 0, 0], [3, 0, 0], [0, 6, 0], [0, 0, 2], [0, 0, 5]])
    assert score(refinement, "many-to-one").miou == pytest.approx(100.0)
    permuted = np.array([[0, 0, 9], [8, 0, 0], [0, 7, 0]])
    assert score(permuted, "hungarian").miou == pytest.approx(100.0)
    assert score(permuted, "many-to-one").miou == pytest.approx(100.0)


def test_bad_inputs():
    features, labels = _blocks()
    with pytest.raises(ConfigError):
        overcluster_scores(features, labels[:2], 3, k=6)
    with pytest.raises(ConfigError):
        overcluster_scores(features, labels, 3, k=6, seeds=())


@pytest.mark.slow
def test_camvid_features_overcluster(tmp_path):
    from pathlib import Path

    from unsupseg.backbones import build_backbone
    from unsupseg.data import build_dataset
    from unsupseg.features.extract import extract_features

    root = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "camvid").resolve()
    if not (root / "val").is_dir():
        pytest.skip(f"real CamVid data not found at {root}")
    data = build_dataset("camvid", str(root), "val")
    data.ids, data.image_paths, data.label_paths = data.ids[:3], data.image_paths[:3], data.label_paths[:3]
    net = build_backbone("efficientnet_lite0")
    store = extract_features(net, data, data.eval_preprocess(120, multiple=8), cache_dir=tmp_path)
    labels = [store.label(i) for i in range(len(store))]
    result = overcluster_scores(store, labels, 11, k=30, seeds=(0, 1), restarts=1, iterations=30)
    # 30 clusters of real ImageNet features on street scenes: far above chance, below perfect
    assert 30 < result["miou"] < 100 and result["pixel_accuracy"] > 60
