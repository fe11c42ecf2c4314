"""Masks written by ``segment`` in the formats annotation tools import.

``coco``          ``annotations.json``: categories (id = class id + 1), images, one annotation per image and
                  class with COCO RLE (pycocotools), area, bbox, and the mean confidence as ``score``
``cvat``          CVAT's "Segmentation mask 1.1" layout: ``SegmentationClass/<name>.png`` (palette PNG, value =
                  class id + 1, 0 = background), ``labelmap.txt``, ``ImageSets/Segmentation/default.txt``
``label-studio``  ``tasks.json`` with BrushLabels predictions (Label Studio's RLE) and ``label_config.xml``
``png``           ``labels/<name>.png`` (class id per pixel) and ``classes.json`` (FiftyOne's mask targets)

Only the masks are read (never the photos; nothing is written beside them). Each image is exported
on its own and written atomically, so memory does not grow with the number of images; the JSON
formats keep one small part per image under ``.parts/`` and join them, streaming, into the final
file at the end. An interrupted export resumes: images whose files exist are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import atomic_path, atomic_write_bytes, atomic_write_text, check_writable_dir, remove_stale_temporaries
from ..errors import ConfigError, DataError, OutputError
from ..evaluation.visualize import palette
from .brush import brush_rle

FORMATS = ("coco", "cvat", "label-studio", "png")
RECORD = ".unsupseg-export.json"
PARTS = ".parts"


@dataclass(frozen=True)
class ExportItem:
    name: str                     # output name without extension (posix, may hold folders)
    file_name: str                # the photo's path relative to the segmented folder (posix)
    mask: Path                    # class id per pixel
    confidence: Path | None       # max probability per pixel (0-255), when segment saved it


def read_mask(item: ExportItem, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with Image.open(item.mask) as im:
            mask = np.asarray(im)
        conf = None
        if item.confidence is not None and item.confidence.is_file():
            with Image.open(item.confidence) as im:
                conf = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise DataError(f"{item.mask}: cannot read the mask ({err})") from None
    if mask.ndim != 2:
        raise DataError(f"{item.mask} is not a mask of class ids (it has {mask.ndim} dimensions)")
    if mask.size and int(mask.max()) >= num_classes:
        raise DataError(f"{item.mask} holds class {int(mask.max())} but the run has {num_classes} classes "
                        "(were the masks written with other labels? re-run segment with --overwrite)")
    if conf is not None and conf.shape != mask.shape:
        raise DataError(f"{item.confidence} is {conf.shape[1]}x{conf.shape[0]}, "
                        f"its mask {mask.shape[1]}x{mask.shape[0]}")
    return mask.astype(np.int64), conf


def _score(conf: np.ndarray | None, where: np.ndarray | None = None) -> float | None:
    if conf is None:
        return None
    values = conf if where is None else conf[where]
    return round(float(values.mean()), 4) if values.size else None


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


class _Format:
    def __init__(self, out: Path, classes: Sequence[str], options: dict):
        self.out, self.classes, self.options = out, list(classes), options

    def files(self, item: ExportItem) -> list[Path]:
        raise NotImplementedError

    def write(self, item: ExportItem, mask: np.ndarray, conf: np.ndarray | None) -> None:
        raise NotImplementedError

    def finish(self, items: Sequence[ExportItem]) -> list[Path]:
        return []


class _Png(_Format):
    def files(self, item):
        return [self.out / "labels" / f"{item.name}.png"]

    def write(self, item, mask, conf):
        atomic_write_bytes(self.files(item)[0], item.mask.read_bytes())

    def finish(self, items):
        path = self.out / "classes.json"
        atomic_write_text(path, json.dumps({"classes": self.classes,
                                            "mask_targets": {str(k): n for k, n in enumerate(self.classes)}}, indent=2))
        return [path]


class _Cvat(_Format):
    def colours(self) -> np.ndarray:
        # the VOC palette: index 0 is black for the background, 1.. distinct colours for the classes
        colours = palette(len(self.classes) + 1)
        colours[0] = (0, 0, 0)
        return colours

    def files(self, item):
        return [self.out / "SegmentationClass" / f"{item.name}.png"]

    def write(self, item, mask, conf):
        image = Image.fromarray((mask + 1).astype(np.uint8), mode="P")
        image.putpalette(self.colours().reshape(-1).tolist())
        with atomic_path(self.files(item)[0]) as tmp:
            image.save(tmp, format="PNG")

    def finish(self, items):
        colours = self.colours()
        lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
        lines += [f"{name}:{','.join(str(int(c)) for c in colours[k + 1])}::" for k, name in enumerate(self.classes)]
        labelmap = self.out / "labelmap.txt"
        listing = self.out / "ImageSets" / "Segmentation" / "default.txt"
        atomic_write_text(labelmap, "\n".join(lines) + "\n")
        _write_lines(listing, (item.name for item in items))
        return [labelmap, listing]


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")


class _Parts(_Format):
    """A JSON part per image under .parts/<format>/, joined into one file by ``finish``."""

    key = ""

    def files(self, item):
        return [self.out / PARTS / self.key / f"{item.name}.json"]

    def write(self, item, mask, conf):
        atomic_write_text(self.files(item)[0], json.dumps(self.part(item, mask, conf)))

    def part(self, item, mask, conf) -> dict:
        raise NotImplementedError

    def parts(self, items: Sequence[ExportItem]) -> Iterable[dict]:
        for item in items:
            yield json.loads(self.files(item)[0].read_text())

    def image_path(self, item: ExportItem) -> str:
        root = self.options.get("image_root")
        return f"{root.rstrip('/')}/{item.file_name}" if root else item.file_name


class _Coco(_Parts):
    key = "coco"

    def part(self, item, mask, conf):
        from pycocotools import mask as coco_mask

        h, w = mask.shape
        anns = []
        for k in np.unique(mask).tolist():
            binary = np.asfortranarray((mask == k).astype(np.uint8))
            rle = coco_mask.encode(binary)
            ann = {"category_id": k + 1, "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                   "area": int(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)], "iscrowd": 0}
            score = _score(conf, mask == k)
            if score is not None:
                ann["score"] = score
            anns.append(ann)
        return {"image": {"file_name": self.image_path(item), "width": w, "height": h}, "annotations": anns}

    def finish(self, items):
        path = self.out / "annotations.json"
        categories = [{"id": k + 1, "name": name, "supercategory": ""} for k, name in enumerate(self.classes)]
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"info": {"description": "unsupseg masks"}, "categories": ')
            fh.write(json.dumps(categories))
            fh.write(', "images": [')
            for i, part in enumerate(self.parts(items)):
                fh.write(("," if i else "") + json.dumps({"id": i + 1, **part["image"]}))
            fh.write('], "annotations": [')
            ann_id = 0
            for i, part in enumerate(self.parts(items)):
                for ann in part["annotations"]:
                    ann_id += 1
                    fh.write(("," if ann_id > 1 else "") + json.dumps({"id": ann_id, "image_id": i + 1, **ann}))
            fh.write("]}\n")
        return [path]


class _LabelStudio(_Parts):
    key = "label-studio"

    def part(self, item, mask, conf):
        h, w = mask.shape
        result = []
        for k in np.unique(mask).tolist():
            rle = brush_rle(mask == k)
            region = {"id": f"c{k}", "from_name": "label", "to_name": "image", "type": "brushlabels",
                      "original_width": w, "original_height": h, "image_rotation": 0,
                      "value": {"format": "rle", "rle": rle, "brushlabels": [self.classes[k]]}}
            score = _score(conf, mask == k)
            if score is not None:
                region["score"] = score
            result.append(region)
        prediction = {"model_version": self.options.get("model_version", "unsupseg"), "result": result}
        score = _score(conf)
        if score is not None:
            prediction["score"] = score
        return {"data": {"image": self.image_path(item)}, "predictions": [prediction]}

    def finish(self, items):
        from xml.sax.saxutils import quoteattr

        tasks = self.out / "tasks.json"
        with atomic_path(tasks) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write("[")
            for i, part in enumerate(self.parts(items)):
                fh.write(("," if i else "") + "\n" + json.dumps(part))
            fh.write("\n]\n")
        colours = palette(len(self.classes))
        labels = "\n".join(f"    <Label value={quoteattr(name)} background={quoteattr(_hex(colours[k]))}/>"
                           for k, name in enumerate(self.classes))
        config = self.out / "label_config.xml"
        atomic_write_text(config, '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
                                  f'  <BrushLabels name="label" toName="image">\n{labels}\n  </BrushLabels>\n</View>\n')
        return [tasks, config]


_WRITERS = {"coco": _Coco, "cvat": _Cvat, "label-studio": _LabelStudio, "png": _Png}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "coco":
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            raise ConfigError("the coco export needs pycocotools: pip install 'unsupseg[export]'") from None


class ExportResult(list):
    """The names of the images exported, with those ``skipped`` (already exported) and the joined
    ``files`` (the JSON, label map and listing files)."""

    def __init__(self):
        super().__init__()
        self.skipped: list[str] = []
        self.files: list[Path] = []


def export_masks(
    items: Sequence[ExportItem],
    classes: Sequence[str],
    fmt: str,
    out: str | os.PathLike,
    *,
    identity: dict,
    image_root: str | None = None,
    model_version: str = "unsupseg",
    overwrite: bool = False,
    track: Callable = lambda items, total, what: items,
) -> ExportResult:
    """Write ``items`` (masks of ``classes``) to ``out`` in format ``fmt``.

    ``identity`` (the masks' origin) is recorded in ``out``: an export of other masks or in another
    format into the same folder is an OutputError unless ``overwrite``.
    """
    check_format(fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    check_writable_dir(out, "--out folder")
    mine = {**identity, "format": fmt, "classes": list(classes), "image_root": image_root}
    record = out / RECORD
    if record.is_file() and not overwrite:
        try:
            theirs = json.loads(record.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            theirs = {}
        if theirs != mine:
            raise OutputError(f"{out} holds another export ({theirs.get('format')} of {theirs.get('masks')}); "
                              "choose another --out, or pass --overwrite to replace it")
    elif not record.is_file() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} is not empty and holds no export of unsupseg; choose another --out "
                          "(or pass --overwrite)")
    atomic_write_text(record, json.dumps(mine, indent=2))
    remove_stale_temporaries(out, recursive=True)
    writer = _WRITERS[fmt](out, classes, {"image_root": image_root, "model_version": model_version})
    result = ExportResult()
    for item in track(items, len(items), f"exporting ({fmt})"):
        files = writer.files(item)
        if not overwrite and all(f.exists() for f in files):
            result.skipped.append(item.name)
            continue
        mask, conf = read_mask(item, len(classes))
        writer.write(item, mask, conf)
        result.append(item.name)
    result.files = writer.finish(items)
    return result
