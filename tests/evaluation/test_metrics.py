import numpy as np
import pytest
import torch

from unsupseg.errors import ConfigError
from unsupseg.evaluation.metrics import ConfusionMatrix, score


def test_hand_computed_three_class_example():
    # rows = predicted cluster, cols = true class
    m = np.array([[0, 2, 8], [5, 1, 0], [1, 6, 2]])
    r = score(m)
    # Hungarian: cluster0->class2 (8), cluster1->class0 (5), cluster2->class1 (6): 19 of 25 pixels
    assert r.mapping == [2, 0, 1]
    assert r.pixel_accuracy == pytest.approx(100 * 19 / 25)
    # IoU class0: tp 5, fp 1 (cluster1 on class1), fn 1 (cluster2 on class0) -> 5/7
    # IoU class1: tp 6, fp 1+2, fn 2+1 -> 6/12; IoU class2: tp 8, fp 2, fn 2 -> 8/12
    expected = [5 / 7, 6 / 12, 8 / 12]
    assert r.per_class_iou == pytest.approx([100 * e for e in expected])
    assert r.miou == pytest.approx(100 * np.mean(expected))


def test_permuted_prediction_scores_100():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(20, 30))
    perm = np.array([2, 0, 3, 1])
    cm = ConfusionMatrix(4, 4)
    cm.update(perm[target], target)
    r = score(cm)
    assert r.miou == 100 and r.pixel_accuracy == 100


def test_ignored_pixels_do_not_change_the_matrix():
    pred = torch.tensor([[0, 1], [1, 0]])
    target = torch.tensor([[0, -1], [1, -1]])
    cm = ConfusionMatrix(2, 2)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    # labels beyond the class range (e.g. raw 255) are ignored too
    cm.update(torch.tensor([1]), torch.tensor([255]))
    assert cm.matrix.sum() == 2


def test_class_absent_from_prediction_and_truth_is_excluded():
    m = np.array([[4, 0, 0], [0, 4, 0], [0, 0, 0]])
    r = score(m)
    assert r.per_class_iou[2] is None
    assert r.miou == 100


def test_extra_clusters_count_as_wrong_with_hungarian():
    # 3 clusters, 2 classes: cluster 2 is unmatched; its pixels are errors, never dropped
    m = np.array([[5, 0], [0, 5], [0, 10]])
    r = score(m, "hungarian")
    assert r.mapping == [0, -1, 1]
    assert r.pixel_accuracy == pytest.approx(100 * 15 / 20)
    # class 1: 10 matched pixels, the 5 of unmatched cluster 1 are false negatives
    assert r.per_class_iou[1] == pytest.approx(100 * 10 / 15)


def test_many_to_one_is_majority_vote():
    m = np.array([[5, 1], [0, 5], [1, 10]])
    r = score(m, "many-to-one")
    assert r.mapping == [0, 1, 1]
    assert r.pixel_accuracy == pytest.approx(100 * 20 / 22)
    # a refinement of the ground truth scores 100
    target = np.repeat(np.arange(2), 10)
    pred = np.arange(20) % 5 + 5 * target  # 10 clusters, each inside one class
    cm = ConfusionMatrix(10, 2)
    cm.update(pred, target)
    assert score(cm, "many-to-one").miou == 100


def test_identity_matching_and_errors():
    m = np.array([[3, 1], [1, 3]])
    assert score(m, "identity").pixel_accuracy == 75
    with pytest.raises(ConfigError, match="unknown matching"):
        score(m, "greedy")
    cm = ConfusionMatrix(2, 2)
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        cm.update(torch.tensor([2]), torch.tensor([0]))
