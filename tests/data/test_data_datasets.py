"""Benchmark layouts on tiny fake trees, their error messages, and the real CamVid copy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.io
from PIL import Image

from unsupseg.data import DATASET_NAMES, Preprocess, SegDataset, build_dataset, load_label
from unsupseg.errors import ConfigError, DataError

# --- COCO-Stuff -------------------------------------------------------------------------------


def _coco_tree(root, write_rgb, write_label, split="val", lists=("Coco164kFull_Stuff_Coarse_7.txt",)):
    base = root / "cocostuff"
    ids = ["000000000139", "000000000285"]
    raws = [np.array([[0, 91, 255, 181], [1, 156, 168, 12]] * 2), np.full((4, 4), 148)]
    for i, raw in zip(ids, raws):
        write_rgb(base / "images" / f"{split}2017" / f"{i}.jpg", height=4, width=4)
        write_label(base / "annotations" / f"{split}2017" / f"{i}.png", raw)
    for name in lists:
        (base / "curated" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (base / "curated" / f"{split}2017" / name).write_text("\n".join(ids) + "\n\n")
    return ids


def test_cocostuff27_val(tmp_path, write_rgb, write_label):
    ids = _coco_tree(tmp_path, write_rgb, write_label)
    ds = build_dataset("cocostuff27", tmp_path, "val")
    assert isinstance(ds, SegDataset) and ds.ids == ids and len(ds) == 2
    assert ds.num_classes == 27 and ds.classes[14] == "food-stuff" and ds.ignore_index == -1
    sample = ds[0]
    assert sample.id == ids[0] and sample.image.mode == "RGB" and sample.label.dtype == np.int64
    np.testing.assert_array_equal(sample.label[:2], [[9, 17, -1, 24], [11, 23, 22, 8]])
    np.testing.assert_array_equal(ds[1].label, np.full((4, 4), 21))
    assert ds.eval_preprocess(320) == Preprocess(320, "short_crop", "nearest")
    assert ds.train_preprocess(224, multiple=8) == Preprocess(224, "short_crop", "nearest", 8)
    # the dataset folder itself is accepted as root too
    assert build_dataset("cocostuff27", tmp_path / "cocostuff", "val").ids == ids


def test_coco171_uses_its_own_val_list(tmp_path, write_rgb, write_label):
    _coco_tree(tmp_path, write_rgb, write_label)  # only the COCO-27 list exists
    expected = tmp_path / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt"
    with pytest.raises(DataError, match=re.escape(str(expected))):
        build_dataset("coco171", tmp_path, "val")
    expected.write_text("000000000139\n")
    ds = build_dataset("coco171", tmp_path, "val")
    assert ds.name == "cocostuff171" and ds.num_classes == 171
    np.testing.assert_array_equal(ds[0].label[:2], [[0, 80, -1, 170], [1, 145, 157, 11]])
    ds81 = build_dataset("coco81", tmp_path, "val")
    np.testing.assert_array_equal(ds81[0].label[:2], [[1, 0, -1, 0], [2, 0, 0, 12]])


def test_coco_unused_id_in_a_label_file_raises(tmp_path, write_rgb, write_label):
    _coco_tree(tmp_path, write_rgb, write_label, lists=("Coco164kFull_Stuff_Coarse.txt",))
    bad = tmp_path / "cocostuff" / "annotations" / "val2017" / "000000000285.png"
    write_label(bad, np.full((4, 4), 11))
    ds = build_dataset("coco81", tmp_path, "val")
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*value\(s\) 11"):
        ds[1]


def test_coco_errors(tmp_path, write_rgb, write_label):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*not found"):
        build_dataset("cocostuff27", tmp_path / "nope", "val")
    expected = tmp_path / "cocostuff" / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt"
    # The message names what the user has: the download command and the docs, no spec file.
    with pytest.raises(DataError, match=re.escape(str(expected)) + ".*unsupseg download cocostuff27.*docs/datasets.md"):
        build_dataset("cocostuff27", tmp_path, "train")
    with pytest.raises(ConfigError, match="split"):
        build_dataset("cocostuff27", tmp_path, "test")
    _coco_tree(tmp_path, write_rgb, write_label)
    (tmp_path / "cocostuff" / "images" / "val2017" / "000000000285.jpg").unlink()
    ds = build_dataset("cocostuff27", tmp_path, "val")
    with pytest.raises(DataError, match="000000000285.jpg: file not found"):
        ds[1]


# --- Cityscapes -------------------------------------------------------------------------------


def _cityscapes_tree(root, write_rgb, write_label):
    base = root / "cityscapes"
    names = [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")]
    for city, name in names:
        write_rgb(base / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", height=2, width=4)
        write_label(base / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png",
                    [[0, 6, 7, 8], [26, 33, 34, 255]])
    return [f"{city}/{name}" for city, name in names]


def test_cityscapes(tmp_path, write_rgb, write_label):
    ids = _cityscapes_tree(tmp_path, write_rgb, write_label)
    ds = build_dataset("cityscapes", tmp_path, "val")
    assert ds.name == "cityscapes27" and ds.ids == ids and ds.num_classes == 27
    np.testing.assert_array_equal(ds[1].label, [[-1, -1, 0, 1], [19, 26, -1, -1]])


def test_cityscapes_errors(tmp_path, write_rgb, write_label):
    (tmp_path / "empty").mkdir()
    expected = tmp_path / "empty" / "cityscapes" / "leftImg8bit" / "val"
    with pytest.raises(DataError, match=re.escape(str(expected))):
        build_dataset("cityscapes27", tmp_path / "empty", "val")
    _cityscapes_tree(tmp_path, write_rgb, write_label)
    missing = tmp_path / "cityscapes" / "gtFine" / "val" / "lindau"
    missing = missing / "lindau_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))):
        build_dataset("cityscapes27", tmp_path, "val")


# --- Pascal VOC -------------------------------------------------------------------------------


def _voc_tree(base, write_rgb):
    ids = ["2007_000032", "2007_000039"]
    for i in ids:
        write_rgb(base / "JPEGImages" / f"{i}.jpg", height=2, width=3)
        label = Image.new("P", (3, 2))
        label.putpalette([v for c in range(256) for v in (c, c, c)])
        label.putdata([0, 15, 255, 20, 21, 1])
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        label.save(base / "SegmentationClass" / f"{i}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids))
    return ids


@pytest.mark.parametrize("nesting", ["VOCdevkit/VOC2012", "pascalvoc/VOCdevkit/VOC2012"])
def test_voc(tmp_path, write_rgb, nesting):
    ids = _voc_tree(tmp_path / nesting, write_rgb)
    ds = build_dataset("pascalvoc", tmp_path, "val")
    assert ds.name == "voc21" and ds.ids == ids and ds.num_classes == 21
    np.testing.assert_array_equal(ds[0].label, [[0, 15, -1], [20, -1, 1]])
    assert ds.eval_preprocess(320) == Preprocess(320, "square", "nearest")
    assert ds.eval_preprocess(448, 16, "bilinear") == Preprocess(448, "square", "bilinear", 16)


def test_leopart_voc_evaluation_resizes_images_bilinear_and_labels_nearest(tmp_path, write_rgb):
    # docs/methods/leopart.md §2.1: the Leopart run's evaluation squashes images bilinearly, labels nearest
    from unsupseg.api import resolve_config

    _voc_tree(tmp_path / "VOCdevkit" / "VOC2012", write_rgb)
    ds = build_dataset("voc21", tmp_path, "val")
    interpolation = resolve_config("leopart", preset="voc21").test.interpolation
    prep = ds.eval_preprocess(4, interpolation=interpolation)
    assert prep == Preprocess(4, "square", "bilinear")
    image, label = prep.apply(ds[0].image, ds[0].label)
    # 3 -> 4 columns, 2 -> 4 rows: nearest repeats label pixels, never mixes ids
    np.testing.assert_array_equal(label.numpy(), [[0, 15, 15, -1], [0, 15, 15, -1], [20, -1, -1, 1], [20, -1, -1, 1]])
    expected = np.asarray(ds[0].image.resize((4, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal((image.numpy() * 255).round(), expected)
    assert not np.array_equal(
        expected, np.asarray(ds[0].image.resize((4, 4), Image.Resampling.NEAREST)).transpose(2, 0, 1)
    )


def test_voc_trainaug_reads_aug_masks(tmp_path, write_rgb):
    # Leopart's trainaug: ids absent from SegmentationClass, masks in SegmentationClassAug.
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _voc_tree(base, write_rgb)
    write_rgb(base / "JPEGImages" / "2008_000002.jpg", height=2, width=3)
    (base / "SegmentationClassAug").mkdir()
    Image.fromarray(np.array([[0, 7, 255], [7, 7, 0]], dtype=np.uint8)).save(
        base / "SegmentationClassAug" / "2008_000002.png"
    )
    (base / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("2008_000002\n")
    ds = build_dataset("voc21", tmp_path, "trainaug")
    assert ds.ids == ["2008_000002"]
    np.testing.assert_array_equal(ds[0].label, [[0, 7, -1], [7, 7, 0]])


def test_voc_missing_split_list(tmp_path, write_rgb):
    _voc_tree(tmp_path / "VOCdevkit" / "VOC2012", write_rgb)
    expected = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"
    with pytest.raises(DataError, match=re.escape(str(expected))):
        build_dataset("voc21", tmp_path, "train")


# --- Potsdam ----------------------------------------------------------------------------------


def test_potsdam(tmp_path):
    base = tmp_path / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    rgbir = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    gt = np.array([[0, 1, 2, 3], [4, 5, 255, 0], [1, 1, 1, 1]])
    scipy.io.savemat(base / "imgs" / "t0.mat", {"img": rgbir})
    scipy.io.savemat(base / "gt" / "t0.mat", {"gt": gt.astype(np.float64)})  # MATLAB doubles
    colours = np.zeros((3, 4, 3), dtype=np.uint8)
    colours[0, 0] = (0, 0, 255)  # building; the rest black = unknown
    scipy.io.savemat(base / "imgs" / "t1.mat", {"img": rgbir})
    scipy.io.savemat(base / "gt" / "t1.mat", {"gt": colours})
    (base / "labelled_test.txt").write_text("t0\nt1\n")
    ds3 = build_dataset("potsdam", tmp_path, "val")
    assert ds3.name == "potsdam3" and ds3.num_classes == 3
    sample = ds3[0]
    np.testing.assert_array_equal(np.asarray(sample.image), rgbir[:, :, :3])  # IR dropped
    np.testing.assert_array_equal(sample.label, [[0, 1, 2, 2], [0, 1, -1, 0], [1, 1, 1, 1]])
    assert ds3[1].label[0, 0] == 1 and (ds3[1].label.ravel()[1:] == -1).all()
    ds6 = build_dataset("potsdam6", tmp_path, "labelled_test")
    np.testing.assert_array_equal(ds6[0].label, np.where(gt == 255, -1, gt))
    with pytest.raises(DataError, match=re.escape(str(base / "labelled_train.txt"))):
        build_dataset("potsdam6", tmp_path, "train")


def test_potsdam_bad_mat(tmp_path):
    base = tmp_path / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    scipy.io.savemat(base / "imgs" / "t0.mat", {"image": np.zeros((2, 2, 4), dtype=np.uint8)})
    (base / "labelled_test.txt").write_text("t0\n")
    with pytest.raises(DataError, match="t0.mat: key 'img' missing"):
        build_dataset("potsdam3", tmp_path, "val")[0]


# --- CamVid (fake layout) and directory -------------------------------------------------------


def test_camvid_label_size_mismatch_names_both_files(tmp_path, write_rgb, write_label):
    image = write_rgb(tmp_path / "val" / "f1.png", height=4, width=6)
    label = write_label(tmp_path / "valannot" / "f1.png", np.zeros((5, 6)))
    ds = build_dataset("camvid", tmp_path, "val")
    with pytest.raises(DataError) as err:
        ds[0]
    message = str(err.value)
    assert str(image) in message and str(label) in message
    assert "6x5" in message and "6x4" in message


def test_camvid_fake_layout_errors(tmp_path, write_rgb):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "val"))):
        build_dataset("camvid", tmp_path, "val")
    write_rgb(tmp_path / "val" / "f1.png")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "valannot"))):
        build_dataset("camvid", tmp_path, "val")
    (tmp_path / "valannot").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "valannot" / "f1.png"))):
        build_dataset("camvid", tmp_path, "val")


def test_directory_layout(tmp_path, write_rgb, write_label):
    write_rgb(tmp_path / "imgs" / "train" / "b.jpg")
    write_rgb(tmp_path / "imgs" / "train" / "a.jpg")
    ds = build_dataset("directory", tmp_path, "train")
    assert ds.ids == ["a", "b"] and ds[0].label is None and ds.num_classes is None
    write_label(tmp_path / "labels" / "train" / "a.png", np.full((6, 8), 2))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "labels" / "train" / "b.png"))):
        build_dataset("directory", tmp_path, "train")
    b_label = np.array([[255, 4]] * 3 + [[0, 1]] * 3).repeat(4, axis=1)  # 6 x 8
    write_label(tmp_path / "labels" / "train" / "b.png", b_label)
    ds = build_dataset("directory", tmp_path, "train")
    assert ds[1].label[0, 0] == -1 and ds[1].label[0, 4] == 4
    ds = build_dataset("directory", tmp_path, "train", classes=["x", "y", "z"])
    assert ds.num_classes == 3
    np.testing.assert_array_equal(ds[0].label, np.full((6, 8), 2))
    with pytest.raises(DataError, match="b.png"):
        ds[1]  # value 4 is beyond the 3 named classes


def test_unknown_names_and_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="known datasets"):
        build_dataset("imagenet", tmp_path, "val")
    with pytest.raises(ConfigError, match="classes"):
        build_dataset("voc21", tmp_path, "val", classes=["a"])
    with pytest.raises(ConfigError, match="split"):
        build_dataset("voc21", tmp_path, "../val")
    assert {"cocostuff27", "cocostuff171", "coco81", "cityscapes27", "voc21", "potsdam3",
            "potsdam6", "camvid", "directory", "cropped"} == set(DATASET_NAMES)


# --- real CamVid ------------------------------------------------------------------------------


def test_real_camvid_split_sizes(camvid_root):
    train = build_dataset("camvid", camvid_root, "train")
    val = build_dataset("camvid", camvid_root, "val")
    assert len(train) == 367 and len(val) == 101
    assert train.classes[0] == "sky" and train.classes[10] == "bicyclist" and train.num_classes == 11
    assert not set(train.ids) & set(val.ids)
    assert train.fingerprint() != val.fingerprint()
    assert val.eval_preprocess(360) == Preprocess(360, "short", "bilinear")


@pytest.mark.slow
def test_real_camvid_val_labels(camvid_root):
    val = build_dataset("camvid", camvid_root, "val")
    seen, void_pixels = set(), 0
    for i in range(len(val)):
        sample = val[i]
        assert sample.image.size == (480, 360) and sample.label.shape == (360, 480)
        raw = load_label(val.label_paths[i])
        void = raw == 11
        void_pixels += int(void.sum())
        assert (sample.label[void] == -1).all()
        np.testing.assert_array_equal(sample.label[~void], raw[~void])
        seen |= set(np.unique(sample.label).tolist())
    assert seen <= set(range(-1, 11)) and -1 in seen and void_pixels > 0
    assert len(seen) >= 10  # nearly every class occurs in val


def test_real_camvid_native_size_goes_through_unchanged(camvid_root):
    sample = build_dataset("camvid", camvid_root, "val")[0]
    image, label = build_dataset("camvid", camvid_root, "val").eval_preprocess(360, 8).apply(
        sample.image, sample.label
    )
    assert tuple(image.shape) == (3, 360, 480)
    pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels, np.asarray(sample.image))
    np.testing.assert_array_equal(label.numpy(), sample.label)
