"""Preprocess geometry: sizes, crop placement, nearest labels, identity, torchvision parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from unsupseg.data import Preprocess
from unsupseg.errors import ConfigError, DataError


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _as_uint8(tensor):
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "mode,h,w,expected",
    [
        ("short", 30, 40, (24, 32)),
        ("short", 40, 30, (32, 24)),
        ("short", 30, 50, (24, 40)),
        ("short", 36, 50, (24, 33)),  # 50 * 24 / 36 = 33.33 → 33
        ("short", 24, 34, (24, 34)),
        ("short_crop", 30, 50, (24, 24)),
        ("short_crop", 50, 30, (24, 24)),
        ("square", 30, 50, (24, 24)),
        ("none", 30, 50, (30, 50)),
    ],
)
def test_output_shapes(mode, h, w, expected):
    pp = Preprocess(None if mode == "none" else 24, mode)
    image, label = pp.apply(_image(h, w), np.zeros((h, w), dtype=np.int64))
    assert tuple(image.shape) == (3, *expected) and tuple(label.shape) == expected
    assert image.dtype == torch.float32 and label.dtype == torch.int64
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert pp.output_size(h, w) == expected


def test_short_rounds_the_long_side_half_up():
    assert Preprocess(2, "short").resized_size(4, 5) == (2, 3)  # 2.5 → 3
    assert Preprocess(2, "short").resized_size(4, 7) == (2, 4)  # 3.5 → 4
    assert Preprocess(3, "short").resized_size(9, 10) == (3, 3)  # 3.33 → 3


def test_short_crop_truncates_like_torchvision():
    assert Preprocess(320, "short_crop").resized_size(480, 640) == (320, 426)


def test_multiple_center_crops_the_extra_pixels():
    pp = Preprocess(24, "short", multiple=8)
    # 30x50 → 24x40: already multiples; 36x50 → 24x33 → crop one column
    assert pp.output_size(30, 50) == (24, 40)
    assert pp.output_size(36, 50) == (24, 32)
    assert Preprocess(None, "none", multiple=4).crop_box(10, 11) == (1, 2, 8, 8)
    # offsets use Python's half-to-even rounding of torchvision center_crop: (11-8)/2 = 1.5 → 2
    image = np.arange(10 * 11, dtype=np.int64).reshape(10, 11)
    _, label = Preprocess(None, "none", multiple=4).apply(_image(10, 11), image)
    np.testing.assert_array_equal(label.numpy(), image[1:9, 2:10])


def test_center_crop_placement_on_hand_made_image():
    # 2 x 6 image of distinct columns, no resize needed: short side 2 → crop 2x2 in the middle.
    pixels = np.zeros((2, 6, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(6) * 40
    label = np.tile(np.arange(6), (2, 1))
    image, out = Preprocess(2, "short_crop", "nearest").apply(Image.fromarray(pixels), label)
    np.testing.assert_array_equal(out.numpy(), [[2, 3], [2, 3]])
    np.testing.assert_array_equal(_as_uint8(image)[:, :, 0], [[80, 120], [80, 120]])
    # 2 x 5: (5 - 2) / 2 = 1.5 rounds to 2 (torchvision), so columns 2 and 3
    _, out = Preprocess(2, "short_crop").apply(Image.fromarray(pixels[:, :5].copy()), label[:, :5])
    np.testing.assert_array_equal(out.numpy(), [[2, 3], [2, 3]])


def test_nearest_keeps_label_values_and_matches_image_sampling():
    rng = np.random.default_rng(3)
    label = rng.choice([-1, 0, 5, 26], size=(37, 53)).astype(np.int64)
    # encode the label into the image so both resizes can be compared pixel by pixel
    pixels = np.stack([(label + 1).astype(np.uint8) * 9] * 3, axis=-1)
    for mode in ("short", "short_crop", "square"):
        pp = Preprocess(20, mode, "bilinear")
        _, out = pp.apply(Image.fromarray(pixels), label)
        assert set(np.unique(out.numpy())) <= {-1, 0, 5, 26}
        image_nearest, _ = Preprocess(20, mode, "nearest").apply(Image.fromarray(pixels))
        np.testing.assert_array_equal(_as_uint8(image_nearest)[:, :, 0], (out.numpy() + 1) * 9)


def test_image_at_target_size_is_unchanged():
    img = _image(360, 480, seed=7)
    pp = Preprocess(360, "short", "bilinear", multiple=8)
    image, _ = pp.apply(img)
    np.testing.assert_array_equal(_as_uint8(image), np.asarray(img))
    for mode in ("short_crop", "square"):
        square = _image(32, 32, seed=8)
        image, _ = Preprocess(32, mode, "bilinear", multiple=16).apply(square)
        np.testing.assert_array_equal(_as_uint8(image), np.asarray(square))


@pytest.mark.parametrize("h,w", [(48, 64), (64, 47), (33, 33), (100, 41)])
def test_short_crop_nearest_matches_torchvision_reference(h, w):
    img = _image(h, w, seed=h + w)
    ours, _ = Preprocess(24, "short_crop", "nearest").apply(img)
    ref = T.Compose([T.Resize(24, T.InterpolationMode.NEAREST), T.CenterCrop(24), T.ToTensor()])(img)
    assert torch.equal(ours, ref)


def test_bilinear_short_matches_torchvision_antialiased_resize():
    img = _image(60, 90, seed=2)
    ours, _ = Preprocess(40, "short", "bilinear").apply(img)
    ref = T.ToTensor()(T.Resize(40, T.InterpolationMode.BILINEAR, antialias=True)(img))
    assert torch.equal(ours, ref)


def test_square_nearest_matches_torchvision():
    img = _image(30, 45, seed=4)
    ours, _ = Preprocess(20, "square", "nearest").apply(img)
    ref = T.ToTensor()(T.Resize((20, 20), T.InterpolationMode.NEAREST)(img))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 0},
        {"resolution": 24, "mode": "crop"},
        {"resolution": 24, "interpolation": "bicubic"},
        {"resolution": 24, "multiple": 0},
        {"resolution": 8, "multiple": 16},
        {"resolution": None, "mode": "short"},
        {"resolution": True},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ConfigError):
        Preprocess(**kwargs)


def test_mismatched_label_and_non_rgb_input():
    with pytest.raises(DataError, match="does not match"):
        Preprocess(8).apply(_image(10, 12), np.zeros((12, 10), dtype=np.int64))
    with pytest.raises(DataError, match="RGB"):
        Preprocess(8).apply(Image.new("L", (10, 10)))


def test_too_small_for_multiple():
    with pytest.raises(DataError, match="too small"):
        Preprocess(None, "none", multiple=16).apply(_image(10, 40))


def test_preprocess_is_hashable_and_comparable():
    assert Preprocess(24, "short") == Preprocess(24, "short")
    assert len({Preprocess(24, "short"), Preprocess(24, "short"), Preprocess(24, "square")}) == 2
