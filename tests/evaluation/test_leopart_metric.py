"""Leopart's own metric (PredsmIoU) against the values its code computed (reference leopart_eval.npz;
exact: integer counts), plus a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference_data import load
from unsupseg.errors import ConfigError
from unsupseg.evaluation.metrics import ConfusionMatrix, leopart_score

MATCHING = {
    "hung": "hungarian-iou",
    "hungp": "hungarian-iou",
    "m2op": "many-to-one-precision",
    "m2oi": "many-to-one-iou",
}


@pytest.mark.parametrize("case", sorted(MATCHING))
def test_matches_the_reference_metric(case):
    ref = load("leopart_eval.npz")
    gt, pred = ref["gt"], ref[f"{case}_pred"]
    assert bool(ref[f"{case}_many_to_one"]) == MATCHING[case].startswith("many")
    assert bool(ref[f"{case}_precision_based"]) == MATCHING[case].endswith("precision")
    confusion = ConfusionMatrix(int(ref[f"{case}_num_pred"]), int(ref["num_gt"]))
    confusion.update(pred, gt)   # 255 lies outside the 6 classes: ignored, as the reference's gt != 255
    result = leopart_score(confusion, MATCHING[case])
    assert result.miou == ref[f"{case}_miou"]
    for key in ("tp", "fp", "fn", "iou"):
        np.testing.assert_array_equal(getattr(result, key), ref[f"{case}_{key}"], err_msg=key)
    np.testing.assert_array_equal(result.scores, ref[f"{case}_score"])
    assert result.background_fraction == ref[f"{case}_bg_fraction"]
    valid = gt != ref["ignore"]
    np.testing.assert_array_equal(result.mapping[pred[valid]], ref[f"{case}_reordered"])
    if case.startswith("hung"):
        np.testing.assert_array_equal(result.mapping[ref[f"{case}_match_pred"]], ref[f"{case}_match_gt"])
    else:
        np.testing.assert_array_equal(result.mapping, ref[f"{case}_pred_to_gt"])


def test_hand_computed_hungarian_on_iou():
    # clusters x classes. Counts would match cluster 0 -> class 1 (9 + 0 + 4 = 13 pixels against 11);
    # IoU keeps the identity: 4/20 + 3/12 + 4/11 = 0.81 against 9/23 + 0 + 4/11 = 0.76
    matrix = np.array([[4, 9, 7], [0, 3, 0], [0, 0, 4]])
    result = leopart_score(matrix, "hungarian-iou")
    np.testing.assert_array_equal(result.mapping, [0, 1, 2])
    np.testing.assert_array_equal(result.tp, [4, 3, 4])
    np.testing.assert_array_equal(result.fp, [16, 0, 0])
    np.testing.assert_array_equal(result.fn, [0, 9, 7])
    np.testing.assert_allclose(result.iou, [4 / 20, 3 / 12, 4 / 11])
    assert result.pixel_accuracy == pytest.approx(11 / 27)
    # a fourth cluster left unmatched goes to class 0: its class-2 pixel becomes a false positive of class 0
    result = leopart_score(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 4], [3, 0, 1]]), "hungarian-iou")
    np.testing.assert_array_equal(result.mapping, [0, 1, 2, 0])
    np.testing.assert_allclose(result.iou, [8 / 9, 1, 4 / 5])
    # a class without pixels still counts in the mean, with IoU 0
    assert leopart_score(np.array([[5, 0, 0], [0, 5, 0]]), "hungarian-iou").miou == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="unknown matching"):
        leopart_score(matrix, "hungarian")
