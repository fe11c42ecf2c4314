"""Evaluation protocols: per-image Hungarian (DiffCut's) against hand-computed examples."""

import numpy as np
import pytest

from unsupseg.api import _protocols
from unsupseg.errors import ConfigError
from unsupseg.evaluation.metrics import ConfusionMatrix, PerImageHungarian, score

# 3 clusters (rows) x 3 classes (columns), one matrix per image
# image 1: class 2 absent; cluster 2 holds only pixels of class 0 (a leftover cluster)
IMAGE1 = np.array([[3, 0, 0],
                   [1, 2, 0],
                   [2, 0, 0]])
# image 2: only class 2 present, split over all three clusters (more clusters than classes)
IMAGE2 = np.array([[0, 0, 1],
                   [0, 0, 1],
                   [0, 0, 4]])


def test_per_image_hand_computed():
    metric = PerImageHungarian(3)
    metric.add(IMAGE1)
    metric.add(IMAGE2)
    # image 1: class0 -> cluster0 (3), class1 -> cluster1 (2); cluster2 unmatched: its 2 pixels are
    #   wrong for class 0 (FN), never FP of the absent class 2.
    #   TP [3, 2, 0], FP [0, 1, 0] (cluster1's class-0 pixel), FN [3, 0, 0]
    # image 2: class2 -> cluster2 (4); clusters 0 and 1 unmatched: TP [0, 0, 4], FN [0, 0, 2]
    assert metric.tp.tolist() == [3, 2, 4]
    assert metric.fp.tolist() == [0, 1, 0]
    assert metric.fn.tolist() == [3, 0, 2]
    r = metric.scores()
    expected = [3 / 6, 2 / 3, 4 / 6]
    assert r.per_class_iou == pytest.approx([100 * e for e in expected])
    assert r.miou == pytest.approx(100 * np.mean(expected))
    assert r.pixel_accuracy == pytest.approx(100 * 9 / 14)
    assert r.matching == "per-image"


def test_dataset_wide_on_the_same_images_is_lower():
    # the summed matrix, matched once: c0->0, c1->1, c2->2 (9 of 14 pixels)
    # IoU0 = 3 / (3 + 1 + 3), IoU1 = 2 / (2 + 2 + 0), IoU2 = 4 / (4 + 2 + 2)
    r = score(IMAGE1 + IMAGE2, "hungarian")
    assert r.miou == pytest.approx(100 * np.mean([3 / 7, 2 / 4, 4 / 8]))
    assert r.pixel_accuracy == pytest.approx(100 * 9 / 14)


def test_fewer_clusters_than_present_classes():
    metric = PerImageHungarian(2)
    metric.add(np.array([[2, 3]]))    # one cluster over 2 pixels of class 0 and 3 of class 1
    # the cluster goes to class 1 (3 pixels); class 0 is unmatched: all its pixels are FN
    assert (metric.tp.tolist(), metric.fp.tolist(), metric.fn.tolist()) == ([0, 3], [0, 2], [2, 0])
    assert metric.scores().per_class_iou == pytest.approx([0.0, 60.0])


def test_image_matrices_come_from_the_same_pass():
    target = np.array([[0, 0, 1], [-1, 1, 1]])
    pred = np.array([[1, 1, 0], [2, 0, 2]])
    cm = ConfusionMatrix(3, 2)
    image = cm.update(pred, target)
    # the ignored pixel (-1) is not counted; cluster 2's one labelled pixel is class 1
    assert image.tolist() == [[0, 2], [2, 0], [0, 1]]
    assert cm.matrix.tolist() == image.tolist()


def test_protocol_names():
    assert _protocols(None, 5, 5) == ["dataset"]
    assert _protocols(None, 7, 5) == ["many-to-one"]
    assert _protocols(["per-image", "hungarian", "per-image"], 5, 5) == ["per-image", "dataset"]
    assert _protocols("all", 5, 5) == ["dataset", "per-image", "many-to-one"]
    with pytest.raises(ConfigError, match="unknown matching 'diffcut'"):
        _protocols(["diffcut"], 5, 5)
