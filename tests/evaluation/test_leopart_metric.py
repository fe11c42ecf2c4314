"""Leopart's own metric (PredsmIoU) against the values its code computed (reference leopart_eval.npz;
exact: integer counts), plus a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference_data import load
from unsupseg.errors import ConfigError
from unsupseg.evaluation.metrics import ConfusionMatrix, leopart_score

MATCHING = {"hung": "hungarian-iou", "hungp": "hungarian-iou", "m2op": "many-to-one-precision", "m2oi": "many-to-one-iou"}


@pytest.mark.parametrize("case", sorted(MATCHING))
def test_matches_the_reference_metric(case):
    ref = load("leopart_eval.npz")
    gt, pred = ref["gt"], ref[f"{case}_pred"]
    confusion = ConfusionMatrix(int(ref[f"{case}_num_pred"]), int(ref["num_gt"]))
    confusion.update(pred, gt)   # 255 lies outside the 6 classes: ignored, as the reference's gt != 255
    result = leopart_score(confusion, MATCHING[case])
    assert result.miou == ref[f"{case}_miou"]
    for key in ("tp", "fp", "fn", "iou"):
        np.testing.assert_array_equal(getattr(result, key), ref[f"{case}_{key}"], err_msg=key)
    np.testing.assert_array_equal(result.scores, ref[f"{case}_score"])
    assert result.background_fraction == ref[f"{case}_bg_fraction"]
    valid = gt != 255
    np.testing.assert_array_equal(result.mapping[pred[valid]], ref[f"{case}_reordered"])
    if case.startswith("hung"):
        np.testing.assert_array_equal(result.mapping[ref[f"{case}_match_pred"]], ref[f"{case}_match_gt"])
    else:
        np.testing.assert_array_equal(result.mapping, ref[f"{case}_pred_to_gt"])


def test_hand_computed_hungarian_on_iou():
    # clusters x classes. Counts would match cluster 0 -> class 0 (10 pixels); IoU prefers 0 -> 1:
    # IoU(0,0) = 10/(20+30-10) = 0.25, IoU(0,1) = 8/(20+8-8) = 0.4; cluster 1: IoU(1,0) = 20/(20+30-20) = 2/3
    matrix = np.array([[10, 8, 2], [20, 0, 0], [0, 0, 5]])
    result = leopart_score(matrix, "hungarian-iou")
    np.testing.assert_array_equal(result.mapping, [1, 0, 2])
    np.testing.assert_array_equal(result.tp, [20, 8, 5])
    np.testing.assert_allclose(result.iou, [20 / 30, 8 / 20, 5 / 7])
    assert result.pixel_accuracy == pytest.approx(33 / 45)
    # a fourth cluster left unmatched goes to class 0: its class-2 pixel becomes a false positive of class 0
    result = leopart_score(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 4], [3, 0, 1]]), "hungarian-iou")
    np.testing.assert_array_equal(result.mapping, [0, 1, 2, 0])
    np.testing.assert_allclose(result.iou, [8 / 9, 1, 4 / 5])
    # a class without pixels still counts in the mean, with IoU 0
    assert leopart_score(np.array([[5, 0, 0], [0, 5, 0]]), "hungarian-iou").miou == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="unknown matching"):
        leopart_score(matrix, "hungarian")
