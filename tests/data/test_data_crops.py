"""Offline crops: geometry against hand-computed boxes and torchvision, files, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from unsupseg.data import (
    CroppedDataset,
    CropView,
    FileDataset,
    ImageFolder,
    build_dataset,
    crop_boxes,
    crop_size,
    five_crop_boxes,
    prepare_crops,
    ten_crop_boxes,
)
from unsupseg.data.labelmaps import CAMVID11
from unsupseg.errors import ConfigError, DataError


def test_five_crop_boxes_of_a_6x8_image_by_hand():
    # H=6, W=8, ratio 0.5 → crop 3x4; center top = round(1.5) = 2, left = round(2.0) = 2.
    assert crop_size(6, 8, 0.5) == (3, 4)
    boxes = [(b.top, b.left, b.height, b.width) for b in five_crop_boxes(6, 8, 3, 4)]
    assert boxes == [(0, 0, 3, 4), (0, 4, 3, 4), (3, 0, 3, 4), (3, 4, 3, 4), (2, 2, 3, 4)]


def test_crop_size_truncates():
    assert crop_size(7, 9, 0.3) == (2, 2)
    assert crop_size(375, 500, 0.7) == (262, 350)


def _apply(image: torch.Tensor, box) -> torch.Tensor:
    crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
    return crop.flip(-1) if box.flipped else crop


@pytest.mark.parametrize(
    "h,w,ch,cw", [(6, 8, 3, 4), (7, 9, 3, 4), (11, 13, 5, 8), (10, 10, 10, 10), (9, 14, 2, 7)]
)
def test_boxes_reproduce_torchvision_five_and_ten_crop(h, w, ch, cw):
    image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    ours5 = [_apply(image, b) for b in five_crop_boxes(h, w, ch, cw)]
    for ours, ref in zip(ours5, TF.five_crop(image, [ch, cw]), strict=True):
        assert torch.equal(ours, ref)
    ours10 = [_apply(image, b) for b in ten_crop_boxes(h, w, ch, cw)]
    for ours, ref in zip(ours10, TF.ten_crop(image, [ch, cw]), strict=True):
        assert torch.equal(ours, ref)


def test_counts_per_kind():
    assert len(crop_boxes(40, 60, "five")) == 5
    assert len(crop_boxes(40, 60, "double")) == 20
    assert len(crop_boxes(40, 60, "super")) == 50
    sizes = sorted({(b.height, b.width) for b in crop_boxes(40, 60, "super")})
    assert sizes == [(12, 18), (16, 24), (20, 30), (24, 36), (28, 42)]
    assert len(crop_boxes(40, 60, "five", [0.5, 0.25])) == 10
    with pytest.raises(ConfigError):
        crop_boxes(40, 60, "triple")
    with pytest.raises(ConfigError):
        crop_boxes(40, 60, "five", 1.5)


def _labelled_dataset(tmp_path, n=2, h=12, w=16) -> FileDataset:
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        images.append(tmp_path / "src" / f"{i}.png")
        labels.append(tmp_path / "src" / f"{i}_label.png")
        images[-1].parent.mkdir(parents=True, exist_ok=True)
        # smooth content, so the lossy JPEG crops stay close to the source pixels
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60 * i)], axis=-1)
        Image.fromarray(pixels.astype(np.uint8)).save(images[-1])
        Image.fromarray(rng.integers(0, 12, (h, w), dtype=np.uint8)).save(labels[-1])  # 11 → -1
    return FileDataset("toy", tmp_path / "src", [str(i) for i in range(n)], images, labels,
                       CAMVID11.classes, CAMVID11)


def test_five_crops_round_trip_labels(tmp_path):
    source = _labelled_dataset(tmp_path)
    crops = prepare_crops(source, "five", tmp_path / "out")
    assert isinstance(crops, CroppedDataset) and len(crops) == 10
    assert crops.classes == list(CAMVID11.classes) and crops.name == "toy_five_crop"
    stored = np.asarray(Image.open(tmp_path / "out" / "label" / "0.png"))
    for i in range(2):
        sample = source[i]
        assert (sample.label == -1).any()
        for k, box in enumerate(five_crop_boxes(12, 16, 6, 8)):
            crop = crops[5 * i + k]
            window = (slice(box.top, box.top + 6), slice(box.left, box.left + 8))
            np.testing.assert_array_equal(crop.label, sample.label[window])
            expected = np.asarray(sample.image)[window].astype(int)
            assert np.abs(np.asarray(crop.image).astype(int) - expected).mean() < 8  # JPEG is lossy
            assert crop.image.size == (8, 6)
    assert stored.dtype == np.uint8 and stored.min() >= 0  # ignore stored as 0
    np.testing.assert_array_equal(stored.astype(np.int64) - 1, source[0].label[:6, :8])


def test_manifest_and_no_leftovers(tmp_path):
    source = _labelled_dataset(tmp_path, n=1)
    prepare_crops(source, "double", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "crops.json").read_text())
    assert manifest["kind"] == "double" and manifest["ratios"] == [0.5, 0.8]
    assert manifest["count"] == 20 and manifest["labelled"] is True
    assert manifest["source"]["name"] == "toy"
    assert manifest["source"]["fingerprint"] == source.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # temp folder renamed away
    assert len(list((tmp_path / "out" / "img").iterdir())) == 20


def test_flipped_crops_are_mirrored(tmp_path):
    source = _labelled_dataset(tmp_path, n=1)
    crops = prepare_crops(source, "double", tmp_path / "out")
    label = source[0].label
    boxes = crop_boxes(12, 16, "double")
    for n in (5, 9, 17):
        b = boxes[n]
        assert b.flipped
        expected = label[b.top : b.top + b.height, b.left : b.left + b.width][:, ::-1]
        np.testing.assert_array_equal(crops[n].label, expected)


def test_super_crops_of_unlabelled_folder(tmp_path, write_rgb):
    write_rgb(tmp_path / "imgs" / "a.jpg", height=20, width=30)
    crops = prepare_crops(ImageFolder(tmp_path / "imgs"), "super", tmp_path / "out")
    assert len(crops) == 50 and crops[0].label is None and crops.classes is None
    assert not (tmp_path / "out" / "label").exists()
    assert crops[0].image.size == (9, 6)  # int(30 * 0.3) x int(20 * 0.3)
    assert crops.eval_transform == ("short", "bilinear")


def test_refuses_existing_non_empty_folder(tmp_path):
    source = _labelled_dataset(tmp_path, n=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_crops(source, "five", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError):
        prepare_crops(source, "five", tmp_path / "file")


def test_empty_existing_folder_is_used(tmp_path):
    source = _labelled_dataset(tmp_path, n=1)
    (tmp_path / "out").mkdir()
    assert len(prepare_crops(source, "five", tmp_path / "out")) == 5


def test_failure_leaves_nothing(tmp_path):
    source = _labelled_dataset(tmp_path, n=2)
    source.image_paths[1].write_bytes(b"")  # the second image becomes unreadable
    with pytest.raises(DataError, match="empty file"):
        prepare_crops(source, "five", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_too_small_image(tmp_path, write_rgb):
    write_rgb(tmp_path / "imgs" / "a.png", height=3, width=3)
    with pytest.raises(DataError, match="too small"):
        prepare_crops(ImageFolder(tmp_path / "imgs"), "super", tmp_path / "out")


def test_cropped_dataset_via_build_dataset_and_errors(tmp_path):
    source = _labelled_dataset(tmp_path, n=1)
    prepare_crops(source, "five", tmp_path / "cropped" / "train")
    ds = build_dataset("cropped", tmp_path / "cropped", "train")
    assert len(ds) == 5 and ds[4].label.shape == (6, 8)
    (tmp_path / "cropped" / "train" / "img" / "4.jpg").unlink()
    with pytest.raises(DataError, match="expected 5 crop files"):
        CroppedDataset(tmp_path / "cropped" / "train")
    with pytest.raises(DataError, match="crops.json"):
        build_dataset("cropped", tmp_path / "cropped", "val")
    with pytest.raises(DataError, match="crops.json"):
        CroppedDataset(tmp_path)
    manifest_path = tmp_path / "cropped" / "train" / "crops.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["source"]["classes"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lacks classes"):
        CroppedDataset(tmp_path / "cropped" / "train")


@pytest.mark.parametrize("kind", ["five", "double", "super"])
def test_crops_on_the_fly_equal_prepared_crops(tmp_path, kind):
    source = _labelled_dataset(tmp_path, n=2, h=30, w=40)
    prepared = prepare_crops(source, kind, tmp_path / "out")
    view = CropView(source, kind)
    assert len(view) == len(prepared) == 2 * {"five": 5, "double": 20, "super": 50}[kind]
    assert view.name == prepared.name and view.classes == prepared.classes
    # every other item, out of order, so the one-image memo is exercised across images
    for n in [*range(len(view) - 1, -1, -2), *range(0, len(view), 2)]:
        a, b = view[n], prepared[n]
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))   # JPEG pixels included
        np.testing.assert_array_equal(a.label, b.label)
        assert view.image_size(n) == b.image.size
    assert view.ids[:2] == ["0/crop0", "0/crop1"]


def test_crops_on_the_fly_refuse_too_small_images(tmp_path, write_rgb):
    write_rgb(tmp_path / "imgs" / "a.png", height=2, width=30)
    view = CropView(ImageFolder(tmp_path / "imgs"), "super")     # 0.3 x 2 px rounds down to 0
    with pytest.raises(DataError, match="too small for crop ratio 0.3"):
        view[0]
