"""Offline training crops (docs/protocols.md §5.1): five / double / super crops written once to disk.

Geometry is torchvision's ``five_crop`` / ``ten_crop`` with crop size ``(int(r*H), int(r*W))``
(not square), computed on the full-resolution image and label alike. Crop k of image i gets the
next running index n, in dataset order, ratio by ratio: ``img/<n>.jpg`` (PIL's default JPEG
quality) and ``label/<n>.png`` (uint8, label + 1, so ignore is stored as 0).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from unsupseg.data.base import FileDataset, Sample, SegDataset
from unsupseg.errors import ConfigError, DataError

MANIFEST_NAME = "crops.json"
_FORMAT = "unsupseg-crops"
_VERSION = 1

# kind → (default ratios, ten-crop i.e. with horizontal flips)
CROP_KINDS: dict[str, tuple[tuple[float, ...], bool]] = {
    "five": ((0.5,), False),
    "double": ((0.5, 0.8), True),
    "super": ((0.3, 0.4, 0.5, 0.6, 0.7), True),
}


class CropBox(NamedTuple):
    """A crop in the coordinates of the original image; ``flipped``: mirror it after cropping."""

    top: int
    left: int
    height: int
    width: int
    flipped: bool = False


def crop_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """(int(H*r), int(W*r)), the truncation the reference crop scripts use."""
    return int(height * ratio), int(width * ratio)


def five_crop_boxes(height: int, width: int, crop_height: int, crop_width: int) -> list[CropBox]:
    """torchvision ``five_crop`` placement: top-left, top-right, bottom-left, bottom-right, center."""
    if not (0 < crop_height <= height and 0 < crop_width <= width):
        raise ConfigError(
            f"crop size {crop_height}x{crop_width} does not fit an image of {height}x{width} (H x W)"
        )
    bottom, right = height - crop_height, width - crop_width
    # torchvision center_crop: int(round(d / 2.0)), Python's half-to-even rounding
    center_top, center_left = int(round(bottom / 2.0)), int(round(right / 2.0))
    corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (center_top, center_left)]
    return [CropBox(top, left, crop_height, crop_width) for top, left in corners]


def ten_crop_boxes(height: int, width: int, crop_height: int, crop_width: int) -> list[CropBox]:
    """torchvision ``ten_crop``: the five crops, then the five crops of the mirrored image."""
    boxes = five_crop_boxes(height, width, crop_height, crop_width)
    # A crop at `left` of the mirrored image is the mirror of the crop at W - left - w.
    mirrored = [CropBox(b.top, width - b.left - b.width, b.height, b.width, True) for b in boxes]
    return boxes + mirrored


def crop_boxes(height: int, width: int, kind: str, ratios: Sequence[float] | None = None) -> list[CropBox]:
    """All crops of one image for ``kind`` (five → 5 per ratio, double/super → 10 per ratio)."""
    ratios, ten = _resolve(kind, ratios)
    boxes: list[CropBox] = []
    for ratio in ratios:
        crop_h, crop_w = crop_size(height, width, ratio)
        make = ten_crop_boxes if ten else five_crop_boxes
        boxes.extend(make(height, width, crop_h, crop_w))
    return boxes


def prepare_crops(
    dataset: SegDataset,
    kind: str,
    out_dir: str | os.PathLike,
    ratio: float | Sequence[float] | None = None,
) -> CroppedDataset:
    """Write the ``kind`` crops of every sample of ``dataset`` to ``out_dir``; return them.

    ``ratio`` overrides the kind's default ratios (five: 0.5; double: 0.5, 0.8; super: 0.3-0.7).
    ``out_dir`` must not exist or be empty: crops are never overwritten. Everything is written
    to a temporary folder beside it, renamed into place at the end, so an interrupted run
    leaves nothing under ``out_dir``.
    """
    ratios, _ = _resolve(kind, ratio)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: already exists and is not an empty folder; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # plain mkdir (not mkdtemp, which makes it private) so the result gets the usual permissions
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        manifest = _write_crops(dataset, kind, ratios, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out_dir)  # atomic; also replaces an empty out_dir
        except OSError as exc:
            raise DataError(f"{out_dir}: cannot move the finished crops into place ({exc})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return CroppedDataset(out_dir)


def _write_crops(dataset: SegDataset, kind: str, ratios: tuple[float, ...], folder: Path) -> dict:
    (folder / "img").mkdir()
    fingerprint = dataset.fingerprint()
    labelled: bool | None = None
    count = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if labelled is None:
            labelled = sample.label is not None
            if labelled:
                (folder / "label").mkdir()
        elif labelled != (sample.label is not None):
            raise DataError(f"{dataset.name}: sample {sample.id!r} breaks the labelled/unlabelled pattern")
        width, height = sample.image.size
        stored = None if sample.label is None else _label_to_stored(sample.label, dataset.name, sample.id)
        for ratio in ratios:
            crop_h, crop_w = crop_size(height, width, ratio)
            if crop_h == 0 or crop_w == 0:
                raise DataError(
                    f"{dataset.name}: image {sample.id!r} ({width}x{height}) is too small for "
                    f"crop ratio {ratio}"
                )
        for box in crop_boxes(height, width, kind, ratios):
            image = sample.image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
            if box.flipped:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.save(folder / "img" / f"{count}.jpg", format="JPEG")
            if stored is not None:
                crop = stored[box.top : box.top + box.height, box.left : box.left + box.width]
                if box.flipped:
                    crop = crop[:, ::-1]
                Image.fromarray(np.ascontiguousarray(crop)).save(folder / "label" / f"{count}.png")
            count += 1
    if count == 0:
        raise DataError(f"{dataset.name}: dataset is empty, no crops written")
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "kind": kind,
        "ratios": list(ratios),
        "count": count,
        "labelled": bool(labelled),
        "source": {
            "name": dataset.name,
            "size": len(dataset),
            "fingerprint": fingerprint,
            "classes": dataset.classes,
            "eval_transform": list(dataset.eval_transform),
            "train_transform": list(dataset.train_transform),
        },
    }


def _label_to_stored(label: np.ndarray, name: str, sample_id: str) -> np.ndarray:
    if label.size and (int(label.min()) < -1 or int(label.max()) > 254):
        raise DataError(
            f"{name}: label of {sample_id!r} has values outside -1..254, which cannot be stored "
            f"as uint8 label + 1"
        )
    return (label + 1).astype(np.uint8)


def _resolve(kind: str, ratio: float | Sequence[float] | None) -> tuple[tuple[float, ...], bool]:
    if kind not in CROP_KINDS:
        raise ConfigError(f"crop kind must be one of {', '.join(CROP_KINDS)}, got {kind!r}")
    defaults, ten = CROP_KINDS[kind]
    if ratio is None:
        ratios = defaults
    elif isinstance(ratio, (int, float)):
        ratios = (float(ratio),)
    else:
        ratios = tuple(float(r) for r in ratio)
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ConfigError(f"crop ratios must lie in (0, 1], got {ratio!r}")
    return ratios, ten


class CroppedDataset(FileDataset):
    """Crops written by ``prepare_crops``; labels read back as stored value - 1."""

    def __init__(self, out_dir: str | os.PathLike):
        out_dir = Path(out_dir)
        manifest = _read_manifest(out_dir)
        count = manifest["count"]
        source = manifest["source"]
        ids = [str(n) for n in range(count)]
        image_paths = [out_dir / "img" / f"{n}.jpg" for n in ids]
        label_paths = [out_dir / "label" / f"{n}.png" for n in ids] if manifest["labelled"] else None
        for folder in ("img", "label") if label_paths else ("img",):
            present = len(os.listdir(out_dir / folder)) if (out_dir / folder).is_dir() else 0
            if present != count:
                raise DataError(
                    f"{out_dir / folder}: expected {count} crop files (per {MANIFEST_NAME}), found {present}"
                )
        super().__init__(
            f"{source['name']}_{manifest['kind']}_crop",
            out_dir,
            ids,
            image_paths,
            label_paths,
            source["classes"],
            _stored_to_label if label_paths else None,
            eval_transform=tuple(source["eval_transform"]),
            train_transform=tuple(source["train_transform"]),
        )
        self.manifest = manifest


def _stored_to_label(raw: np.ndarray, source: Path) -> np.ndarray:
    if raw.dtype != np.uint8:
        raise DataError(f"{source}: crop labels must be 8-bit, got dtype {raw.dtype}")
    return raw.astype(np.int64) - 1


def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{out_dir}: not a crop folder: expected {path} (written by prepare_crops)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read crops manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise DataError(f"{path}: not a crops manifest (expected format {_FORMAT!r})")
    if manifest.get("version") != _VERSION:
        raise DataError(f"{path}: crops manifest version {manifest.get('version')!r} is not supported")
    missing = {"kind", "count", "labelled", "source"} - set(manifest)
    missing |= {"name", "classes", "eval_transform", "train_transform"} - set(manifest.get("source") or {})
    if missing:
        raise DataError(f"{path}: crops manifest lacks {', '.join(sorted(missing))}")
    return manifest


def jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """The pixels ``prepare_crops`` stores: the crop encoded as JPEG (PIL's default quality) and
    decoded again, as the reference trains on its JPEG crop files (docs/methods/stego.md §10.4,
    docs/methods/cause.md §1.4)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class CropView(SegDataset):
    """The ``kind`` crops of ``source`` cut on the fly: item ``n`` is crop ``n % per_image`` of image
    ``n // per_image``, in the order and with the pixels ``prepare_crops`` writes (the JPEG round trip
    included), so training on it equals training on the prepared folder without writing it.

    Each item decodes its source image; the last decoded image is kept (one per process, so per
    DataLoader worker), which makes sequential passes decode every image once.
    """

    def __init__(self, source: SegDataset, kind: str, ratios: Sequence[float] | None = None):
        self.kind = kind
        self.ratios, _ = _resolve(kind, ratios)
        self.source = source
        self.per_image = len(crop_boxes(4, 4, kind, self.ratios))   # fixed per kind, whatever the size
        ids = [f"{sid}/crop{k}" for sid in source.ids for k in range(self.per_image)]
        super().__init__(f"{source.name}_{kind}_crop", source.root, ids, source.classes)
        self.eval_transform = source.eval_transform
        self.train_transform = source.train_transform
        self._last: tuple[int, Sample] | None = None

    def files(self) -> list[Path]:
        return self.source.files()

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}:{self.kind}:{','.join(map(str, self.ratios))}:jpeg"

    def _sample(self, i: int) -> Sample:
        if self._last is None or self._last[0] != i:
            self._last = (i, self.source[i])
        return self._last[1]

    def _box(self, n: int, width: int, height: int) -> CropBox:
        i, k = divmod(n, self.per_image)
        for ratio in self.ratios:
            if 0 in crop_size(height, width, ratio):
                raise DataError(
                    f"{self.source.name}: image {self.source.ids[i]!r} ({width}x{height}) is too small for "
                    f"crop ratio {ratio}"
                )
        return crop_boxes(height, width, self.kind, self.ratios)[k]

    def _load(self, n: int) -> Sample:
        sample = self._sample(n // self.per_image)
        width, height = sample.image.size
        box = self._box(n, width, height)
        image = sample.image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        label = None
        if sample.label is not None:
            label = sample.label[box.top : box.top + box.height, box.left : box.left + box.width]
        if box.flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            label = None if label is None else label[:, ::-1]
        label = None if label is None else np.ascontiguousarray(label)
        return Sample(self.ids[n], jpeg_roundtrip(image), label)

    def image_size(self, n: int) -> tuple[int, int]:
        width, height = self.source.image_size(n // self.per_image)
        box = self._box(n, width, height)
        return box.width, box.height
