"""CAUSE at test time: predictor, flip equivariance, CRF input, metric protocol (docs/methods/cause.md §8.9-8.10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsupseg.api import Segmenter
from unsupseg.config import RunConfig
from unsupseg.errors import CheckpointError
from unsupseg.evaluation.metrics import ConfusionMatrix, score
from unsupseg.methods.base import PredictorInfo
from unsupseg.methods.cause import Params, build_predictor
from unsupseg.methods.cause.heads import MLPHead, TRHead


class FakeBackbone:
    """Only what Segmenter.scores reads from a backbone (the features are given directly)."""

    stride = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def state_of(variant, dim=12, r=5, clusters=4, grid=(4, 6), seed=0):
    torch.manual_seed(seed)
    codebook = torch.randn(7, dim)
    head = MLPHead(dim, r) if variant == "mlp" else TRHead(dim, r, codebook, grid[0] * grid[1], ffn_dim=16)
    state = {f"head_ema.{k}": v for k, v in head.state_dict().items()}
    state.update(codebook=codebook, cluster_probe=torch.randn(clusters, r))
    if variant == "tr":
        state["grid"] = torch.tensor(grid)
    return state, head.eval()


def segmenter(state, clusters=4):
    predictor = build_predictor(Params(), state, PredictorInfo(clusters, 12, 8))
    return Segmenter(RunConfig(method="cause-mlp", clusters=clusters), FakeBackbone(), predictor, torch.device("cpu"))


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_predictor_is_teacher_head_then_cosine(variant):
    state, head = state_of(variant)
    seg = segmenter(state)
    feats = torch.randn(2, 12, 4, 6)
    with torch.no_grad():
        y = head(feats.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 5, 4, 6)
    expected = F.normalize(y, dim=1).permute(0, 2, 3, 1) @ F.normalize(state["cluster_probe"], dim=1).T
    scores = seg.scores(feats, None, (4, 6))
    assert torch.allclose(scores, expected.permute(0, 3, 1, 2), atol=1e-5)
    assert seg.predictor.fixed_grid == ((4, 6) if variant == "tr" else None)


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_feature_scale_multiplies_the_tokens_the_head_sees(variant):
    state, head = state_of(variant)
    predictor = build_predictor(Params(feature_scale=4.0), state, PredictorInfo(4, 12, 8))
    feats = torch.randn(2, 12, 4, 6)
    with torch.no_grad():
        expected = head((4.0 * feats).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 5, 4, 6)
        assert torch.allclose(predictor.embed(feats), expected, atol=1e-5)
        assert not torch.allclose(
            predictor.embed(feats), build_predictor(Params(), state, PredictorInfo(4, 12, 8)).embed(feats)
        )


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_flip_averaged_map_is_exactly_flip_equivariant(variant):
    state, _ = state_of(variant)
    seg = segmenter(state)
    a, b = torch.randn(1, 12, 4, 6), torch.randn(1, 12, 4, 6)  # features of x and of flip(x)
    # at the grid size the upsampling is the identity, so the scores inherit the map's symmetry
    forward = seg.scores(a, b, (4, 6))
    mirrored = seg.scores(b, a, (4, 6))
    assert torch.equal(mirrored, forward.flip(-1))
    assert torch.equal(mirrored.argmax(1), forward.argmax(1).flip(-1))
    # and upsampled, up to float rounding of the interpolation weights
    big = seg.scores(a, b, (32, 48))
    assert torch.allclose(seg.scores(b, a, (32, 48)), big.flip(-1), atol=1e-5)


def test_crf_input_is_a_normalised_log_distribution():
    state, _ = state_of("mlp")
    seg = segmenter(state)
    assert seg.config.test.alpha == 3.0
    scores = seg.scores(torch.randn(2, 12, 4, 6), None, (16, 24))
    probs = seg._finish(scores, None, crf=False)
    assert torch.allclose(probs.sum(1), torch.ones(2, 16, 24), atol=1e-5)
    assert torch.equal(probs.argmax(1), scores.argmax(1))


def test_tr_predictor_tiles_other_grids():
    state, _ = state_of("tr")
    seg = segmenter(state)
    scores = seg.scores(torch.randn(1, 12, 6, 9), None, (48, 72))
    assert scores.shape == (1, 4, 48, 72) and torch.isfinite(scores).all()


def test_missing_state_keys_are_named():
    state, _ = state_of("mlp")
    del state["head_ema.f2.2.weight"]
    with pytest.raises(CheckpointError, match="f2.2.weight"):
        build_predictor(Params(), state, PredictorInfo(4, 12, 8))
    state, _ = state_of("mlp")
    del state["cluster_probe"]
    with pytest.raises(CheckpointError, match="cluster_probe"):
        build_predictor(Params(), state, PredictorInfo(4, 12, 8))


# ----------------------------------------------------------------------------- 10. metric protocol


def test_permuted_prediction_scores_100_and_ignore_pixels_do_not_count():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, (20, 20)))
    perm = torch.tensor([2, 0, 1])
    cm = ConfusionMatrix(3, 3)
    cm.update(perm[labels], labels)
    before = cm.matrix.copy()
    cm.update(torch.zeros(5, 5, dtype=torch.long), torch.full((5, 5), -1))
    assert np.array_equal(cm.matrix, before)
    result = score(cm)
    assert result.miou == pytest.approx(100.0) and result.pixel_accuracy == pytest.approx(100.0)


def test_hand_computed_three_class_example_and_absent_classes():
    # rows = predicted cluster, columns = true class
    matrix = np.array([[5, 1, 0], [0, 3, 2], [1, 0, 4]])
    result = score(matrix)
    assert result.mapping == [0, 1, 2]
    iou = [5 / (5 + 1 + 1), 3 / (3 + 2 + 1), 4 / (4 + 1 + 2)]
    assert result.miou == pytest.approx(100 * np.mean(iou))
    assert result.pixel_accuracy == pytest.approx(100 * 12 / 16)
    # class 2 absent from prediction and ground truth: excluded from the mean
    absent = score(np.array([[4, 1, 0], [2, 3, 0], [0, 0, 0]]))
    assert absent.per_class_iou[2] is None
    assert absent.miou == pytest.approx(100 * np.mean([4 / 7, 3 / 6]))
