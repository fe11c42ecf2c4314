"""Dense CRF refinement: contract, hand-checkable cases and exactness against pydensecrf."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from unsupseg.errors import ConfigError
from unsupseg.postprocess import crf
from unsupseg.postprocess.crf import refine, refine_batch

try:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
except ImportError:  # pragma: no cover - exercised where the reference is not installed
    dcrf = None

needs_reference = pytest.mark.skipif(
    dcrf is None, reason="pydensecrf2 not installed (pip install pydensecrf2)"
)


def _rand_case(h=23, w=31, c=4, seed=0, blocks=True):
    """An image of a few flat colour blocks plus noise, and noisy log-probabilities."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3)).astype(np.int16)
    if blocks:
        img[:, : w // 2] = [200, 40, 40]
        img[h // 2 :, w // 2 :] = [30, 160, 60]
        img = img + rng.integers(-6, 7, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    logits = rng.normal(size=(c, h, w)).astype(np.float32) * 2
    return img, logits


def _log_softmax(x, axis=0):
    return torch.log_softmax(torch.as_tensor(x), dim=axis).numpy()


# ------------------------------------------------------------------------------------------------
# contract


def test_numpy_in_numpy_out_shape_and_sums():
    img, lp = _rand_case()
    q = refine(img, lp)
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    assert q.shape == lp.shape
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_torch_in_torch_out():
    img, lp = _rand_case(seed=1)
    q = refine(torch.from_numpy(img), torch.from_numpy(lp))
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32
    assert q.shape == lp.shape and q.device == torch.device("cpu")
    torch.testing.assert_close(q.sum(0), torch.ones(lp.shape[1:]), atol=1e-5, rtol=0)
    # a numpy image with a torch prediction is fine too; the output follows the prediction
    q2 = refine(img, torch.from_numpy(lp))
    torch.testing.assert_close(q2, q)
    np.testing.assert_allclose(refine(img, lp), q.numpy(), atol=1e-6)


def test_logits_and_log_probs_give_the_same_result():
    img, logits = _rand_case(seed=2)
    np.testing.assert_allclose(
        refine(img, logits + 5.0), refine(img, _log_softmax(logits)), atol=1e-5
    )


@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_batched_equals_looped(chunk_size):
    cases = [_rand_case(h=19, w=27, c=5, seed=s) for s in range(3)]
    imgs = np.stack([c[0] for c in cases])
    lps = np.stack([c[1] for c in cases])
    qb = refine_batch(imgs, lps, chunk_size=chunk_size)
    assert qb.shape == lps.shape
    for i, (img, lp) in enumerate(cases):
        np.testing.assert_allclose(qb[i], refine(img, lp), atol=1e-5)
    qt = refine_batch(torch.from_numpy(imgs), torch.from_numpy(lps))
    assert isinstance(qt, torch.Tensor)
    np.testing.assert_allclose(qt.numpy(), qb, atol=1e-5)


def test_empty_batch():
    out = refine_batch(np.zeros((0, 5, 6, 3), np.uint8), np.zeros((0, 3, 5, 6), np.float32))
    assert out.shape == (0, 3, 5, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():  # pragma: no cover - needs a GPU
    cases = [_rand_case(h=40, w=52, c=6, seed=s) for s in range(2)]
    imgs = torch.from_numpy(np.stack([c[0] for c in cases]))
    lps = torch.from_numpy(np.stack([c[1] for c in cases]))
    q_gpu = refine_batch(imgs.cuda(), lps.cuda())
    assert q_gpu.device.type == "cuda"
    q_cpu = refine_batch(imgs, lps)
    assert (q_gpu.cpu().argmax(1) == q_cpu.argmax(1)).float().mean() > 0.999
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------
# hand-checkable cases


def test_constant_image_spreads_a_confident_label():
    """Flat image; class 2 confident in a block, uniform elsewhere: the CRF spreads class 2."""
    h, w, c = 30, 40, 3
    img = np.full((h, w, 3), 120, np.uint8)
    lp = np.full((c, h, w), np.log(1 / c), np.float32)
    block = np.full(c, np.log(0.02 / (c - 1)), np.float32)
    block[2] = np.log(0.98)
    lp[:, 10:20, 5:15] = block[:, None, None]
    q = refine(img, lp)
    assert (q.argmax(0) == 2).all()
    outside = np.ones((h, w), bool)
    outside[10:20, 5:15] = False
    assert q[2][outside].min() > 0.5  # from 1/3 before the CRF
    # spreading decays with distance (the spatial kernel dominates on a flat image)
    assert q[2, 15, 16] > q[2, 15, 39]


def test_zero_compat_returns_the_softmax():
    img, lp = _rand_case(seed=3)
    q = refine(img, lp, gaussian_compat=0, bilateral_compat=0, unary_clip=None)
    np.testing.assert_allclose(q, torch.softmax(torch.from_numpy(lp), 0).numpy(), atol=1e-6)
    q0 = refine(img, lp, iterations=0, unary_clip=None)
    np.testing.assert_allclose(q0, q, atol=1e-6)
    # with the default clip (as pydensecrf's unary_from_softmax) it is the clipped softmax
    p = np.clip(torch.softmax(torch.from_numpy(lp * 8), 0).numpy(), 1e-5, 1)
    q = refine(img, lp * 8, gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_allclose(q, p / p.sum(0), atol=1e-6)


def test_class_permutation_commutes():
    img, lp = _rand_case(c=6, seed=4)
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(refine(img, lp[perm]), refine(img, lp)[perm], atol=1e-6)


def test_crf_smooths_noise_inside_flat_regions():
    img, lp = _rand_case(h=32, w=32, c=3, seed=5)
    lp = lp * 0.3  # weak, noisy unaries
    labels = refine(img, lp).argmax(0)
    # each flat block ends up (nearly) one label
    for region in (labels[:, :16], labels[16:, 16:]):
        counts = np.bincount(region.ravel(), minlength=3)
        assert counts.max() / counts.sum() > 0.95


# ------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "image, log_probs, kwargs, words",
    [
        (np.zeros((5, 6, 3), np.float32), np.zeros((2, 5, 6), np.float32), {}, ["image", "uint8"]),
        (np.zeros((5, 6), np.uint8), np.zeros((2, 5, 6), np.float32), {}, ["image", "H x W x 3"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((5, 6), np.float32), {}, ["log_probs", "C x H x W"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.int64), {}, ["log_probs", "floating"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 6, 5), np.float32), {}, ["(5, 6, 3)", "(2, 6, 5)"]),
        (np.zeros((5, 6, 3), np.uint8), np.full((2, 5, 6), np.nan, np.float32), {}, ["NaN"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.float32), {"iterations": -1}, ["iterations", "-1"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.float32), {"iterations": 2.5}, ["iterations"]),
        (
            np.zeros((5, 6, 3), np.uint8),
            np.zeros((2, 5, 6), np.float32),
            {"bilateral_srgb": 0},
            ["bilateral_srgb", "0"],
        ),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.float32), {"gaussian_sxy": -1.0}, ["gaussian_sxy"]),
        (
            np.zeros((5, 6, 3), np.uint8),
            np.zeros((2, 5, 6), np.float32),
            {"gaussian_compat": float("inf")},
            ["gaussian_compat"],
        ),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.float32), {"unary_clip": 2.0}, ["unary_clip"]),
        (np.zeros((5, 6, 3), np.uint8), np.zeros((2, 5, 6), np.float32), {"backend": "cuda"}, ["backend", "'cuda'"]),
        ([[1, 2, 3]], np.zeros((2, 5, 6), np.float32), {}, ["image", "list"]),
    ],
)
def test_bad_arguments_raise_config_error(image, log_probs, kwargs, words):
    with pytest.raises(ConfigError) as info:
        refine(image, log_probs, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_batch_shape_mismatch():
    with pytest.raises(ConfigError, match="same B"):
        refine_batch(np.zeros((2, 5, 6, 3), np.uint8), np.zeros((3, 2, 5, 6), np.float32))
    with pytest.raises(ConfigError, match="chunk_size"):
        refine_batch(np.zeros((1, 5, 6, 3), np.uint8), np.zeros((1, 2, 5, 6), np.float32), chunk_size=0)


def test_missing_reference_backend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, lp = _rand_case(h=6, w=7, c=2)
    with pytest.raises(ConfigError, match="pip install pydensecrf2"):
        refine(img, lp, backend="pydensecrf")


# ------------------------------------------------------------------------------------------------
# exactness against the reference (small cases; CamVid in test_postprocess_crf_camvid.py)


@needs_reference
@pytest.mark.parametrize("h, w, seed", [(23, 31, 0), (16, 16, 1), (7, 9, 2)])
def test_matches_pydensecrf_on_small_images(h, w, seed):
    """Marginals equal the reference's to float rounding (713 and 63 pixels exercise densecrf's
    zero-padding vertices; 256 does not)."""
    img, lp = _rand_case(h=h, w=w, c=5, seed=seed)
    ours = refine(img, lp)
    ref = refine(img, lp, backend="pydensecrf")
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@needs_reference
def test_reference_backend_is_the_published_call():
    """backend='pydensecrf' is STEGO's/CAUSE's dense_crf call (BGR image, clipped unary)."""
    img, logits = _rand_case(h=12, w=10, c=3, seed=6)
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    d = dcrf.DenseCRF2D(10, 12, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(img[:, :, ::-1]), compat=4)
    expected = np.asarray(d.inference(10)).reshape(3, 12, 10)
    np.testing.assert_allclose(refine(img, logits, backend="pydensecrf"), expected, atol=1e-7)


@needs_reference
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_lattice_matches_pydensecrf_for_any_dimension(d):
    """Arbitrary d-dimensional features through pydensecrf's addPairwiseEnergy (257 points)."""
    rng = np.random.default_rng(d)
    n, c = 257, 4
    feats = (rng.random((n, d)) * 4).astype(np.float32)
    unary = (rng.random((n, c)) * 3).astype(np.float32)
    ref = dcrf.DenseCRF(n, c)
    ref.setUnaryEnergy(np.ascontiguousarray(unary.T))
    ref.addPairwiseEnergy(np.ascontiguousarray(feats.T), compat=3.0)
    expected = np.asarray(ref.inference(5)).T
    ours = crf._refine_features(torch.from_numpy(unary), [(torch.from_numpy(feats), 3.0)], 5)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-5)


def test_two_threads_match_one():
    img, lp = _rand_case(h=40, w=48, c=5, seed=7)
    one = refine(img, lp)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = refine(img, lp)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(two, one, atol=1e-5)
