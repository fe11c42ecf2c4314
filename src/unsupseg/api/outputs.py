"""``segment``: masks and overlays of photos written into an output folder that records its run."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._io import atomic_write_image, atomic_write_text, check_writable_dir, remove_stale_temporaries
from .._progress import track
from ..config import (
    to_dict,
)
from ..data import ImageFolder, load_image
from ..data.datasets import SEGMENT_RECORD
from ..data.images import DEFAULT_MAX_PIXELS, DataWarning
from ..engine import init_distributed
from ..errors import DataError, OutputError
from ..evaluation.visualize import overlay
from .segmenter import Segmenter, check_max_pixels, load, run_labels


@dataclass(frozen=True)
class OutputItem:
    """One input image and the two files ``segment`` writes for it."""

    source: Path
    name: str          # output name without extension, relative to the output folder (posix)
    mask: Path
    overlay: Path

    def done(self) -> bool:
        return self.mask.exists() and self.overlay.exists()


class PlannedOutputs(list):
    """The OutputItems to write, with the input folders' files that are ``unusable``."""

    def __init__(self):
        super().__init__()
        self.unusable: list[Path] = []


def plan_outputs(paths: Sequence[str | os.PathLike], out: str | os.PathLike, strict: bool = False) -> PlannedOutputs:
    """Every input image under ``paths`` with its output files in ``out``.

    Output names mirror the inputs' folders below their common folder (a/x.png and b/x.png become
    a/x.png and b/x.png in ``out``); an image given twice is segmented once. Masks and overlays found
    in an output folder inside an input folder are not inputs. OutputError when two inputs would
    share an output, or an output would land on an input file. The files of the folders that are not
    used (not images, unreadable; each named in a warning) are in the result's ``unusable``.
    """
    out = Path(out)
    sources: list[tuple[Path, Path]] = []     # (image, the folder its name is relative to)
    items = PlannedOutputs()
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"input {p} does not exist")
        if p.is_dir():
            folder = ImageFolder(p, strict=strict)
            sources += [(f, p) for f in folder.files()]   # leaves earlier outputs out
            items.unusable += folder.unusable
        else:
            sources.append((p, p.parent))
    if not sources:
        return items
    common = Path(os.path.commonpath([str(base.absolute()) for _, base in sources]))
    seen: dict[Path, Path] = {}
    names: dict[str, Path] = {}
    for f, _ in sources:
        real = f.resolve()
        if real in seen:
            continue
        seen[real] = f
        name = f.absolute().relative_to(common).with_suffix("").as_posix()
        if name in names:
            raise OutputError(f"{names[name]} and {f} would both be written as {out / name}.png; "
                              "rename one, or segment them into separate --out folders")
        names[name] = f
        items.append(OutputItem(f, name, out / f"{name}.png", out / f"{name}_overlay.jpg"))
    for item in items:
        for target in (item.mask, item.overlay):
            if target.resolve() in seen:
                raise OutputError(f"the output {target} would replace the input image {seen[target.resolve()]}; "
                                  "choose another --out (nothing was written)")
    return items


def run_identity(seg: Segmenter, crf: bool, inputs: Sequence = ()) -> dict:
    """What a folder of masks records about who wrote them: the run, its model (a hash of config, backbone
    weights and state), the CRF setting, the class names of labels.yaml and the inputs."""
    digest = hashlib.sha256(json.dumps(to_dict(seg.config), sort_keys=True, default=str).encode())
    digest.update(str(seg.backbone.weights_id).encode())
    for key, value in sorted(seg.predictor.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"run": str(seg.path.absolute()) if seg.path is not None else None, "method": seg.config.method,
            "model_sha256": digest.hexdigest(), "crf": crf, "classes": run_labels(seg).classes,
            "inputs": [str(Path(p).absolute()) for p in inputs]}


def claim_output_folder(seg: Segmenter, out: Path, items: list[OutputItem], crf: bool, overwrite: bool,
                        inputs: Sequence = ()) -> None:
    """Check ``out`` takes files, refuse to mix another run's masks in, and record this run there."""
    check_writable_dir(out, "--out folder")
    mine = run_identity(seg, crf, inputs)
    record = out / SEGMENT_RECORD
    if record.is_file() and not overwrite:
        try:
            theirs = json.loads(record.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            theirs = {}
        if (theirs.get("model_sha256"), theirs.get("crf")) != (mine["model_sha256"], mine["crf"]):
            raise OutputError(
                f"{out} holds the masks of another run ({theirs.get('run')}, method {theirs.get('method')}, "
                f"CRF {'on' if theirs.get('crf') else 'off'}); choose another --out, or pass --overwrite to "
                "replace them with this run's"
            )
        if theirs.get("classes", mine["classes"]) != mine["classes"]:
            raise OutputError(f"{out} holds masks written before the run's labels.yaml changed; choose another --out, "
                              "or pass --overwrite to rewrite them with the current names and merges")
    elif not record.is_file() and not overwrite:
        found = next((item for item in items if item.mask.exists() or item.overlay.exists()), None)
        if found is not None:
            raise OutputError(
                f"{out} already holds files named like this call's outputs (e.g. {found.mask.name}) that no "
                "segment call recorded; choose another --out, or pass --overwrite to replace them"
            )
    atomic_write_text(record, json.dumps(mine, indent=2))


def write_outputs(item: OutputItem, image: Image.Image, labels: np.ndarray, num_clusters: int) -> None:
    """The mask (cluster id per pixel, 8- or 16-bit PNG) and the overlay, each written atomically."""
    dtype = np.uint8 if num_clusters <= 256 else np.uint16
    atomic_write_image(item.mask, Image.fromarray(labels.astype(dtype)), format="PNG")
    atomic_write_image(item.overlay, overlay(image, labels, num_clusters), format="JPEG", quality=90)


class SegmentResult(list):
    """The masks written (a list of paths), with the images ``skipped`` because their outputs were
    already there and those that ``failed`` (not images, unreadable or not segmentable, with a warning each)."""

    def __init__(self):
        super().__init__()
        self.skipped: list[Path] = []
        self.failed: list[Path] = []


def segment(
    run: str | os.PathLike | Segmenter,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    crf: bool | None = None,
    overwrite: bool = False,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int | None = None,
    precision: str | None = None,
    confidence: bool = False,
) -> SegmentResult:
    """Write ``<name>.png`` (cluster id per pixel, at the photo's displayed size) and
    ``<name>_overlay.jpg`` for every input image; returns the masks written, in the order written.

    Photos of the same size are segmented ``batch_size`` at a time (default: the run's ``batch_size``
    on a GPU, 1 on CPU; see ``Segmenter.batch_size``); at most that many are held (bounded memory).
    Under torchrun each process takes every world-size-th image of the sorted inputs, so the
    processes share the work and no two write the same file. Images whose outputs exist are skipped
    (counted in ``result.skipped``) unless ``overwrite``; an image that cannot be read or segmented
    is skipped with a warning naming it (an error when ``strict``); images above ``max_pixels`` are
    downscaled with a warning and their outputs written at that size. Every file is written
    atomically. ``out`` records the run; masks of another run there are an error unless
    ``overwrite``. Nothing is ever written onto an input. ``precision`` (auto | bf16 | fp32)
    applies when ``run`` is a path. With the run's labels.yaml, masks hold class ids (merged clusters,
    see ``unsupseg.labels``). ``confidence`` also writes ``<name>_confidence.png`` (the maximum
    probability per pixel, 0-255).
    """
    check_max_pixels(max_pixels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder for the masks and overlays")
    items = plan_outputs(inputs, out, strict)
    seg = run if isinstance(run, Segmenter) else load(run, precision=precision)
    names = run_labels(seg)       # a bad labels.yaml stops the call before anything is written
    crf = seg.config.test.crf if crf is None else crf
    dist = init_distributed(seg.device.type)
    if dist.is_main:
        claim_output_folder(seg, out, items, crf, overwrite, inputs)
        # temporary files of earlier calls that were killed (kill -9 skips the clean-up); a live
        # neighbour's are left alone
        remove_stale_temporaries(out, recursive=True)
    dist.barrier()
    result = SegmentResult()
    if dist.is_main:
        result.failed += items.unusable
    mine = items[dist.rank :: dist.world_size]

    def failed(item, err: Exception) -> None:
        if strict:
            raise err if isinstance(err, DataError) else DataError(f"{item.source}: cannot segment ({err})") from err
        warnings.warn(f"skipping {item.source}: {err}" if not isinstance(err, DataError)
                      else f"skipping unreadable image: {err}", DataWarning, stacklevel=3)
        result.failed.append(item.source)

    def todo():
        for item in track(mine, len(mine), "segmenting"):
            if not overwrite and item.done() and not (confidence and not confidence_path(item).exists()):
                result.skipped.append(item.source)
                continue
            try:
                image = load_image(item.source, max_pixels=max_pixels)
            except DataError as err:
                failed(item, err)
                continue
            yield item, image

    stream = seg.predict_stream(todo(), crf=crf, batch_size=batch_size, name=lambda item: str(item.source),
                                on_error=failed, confidence=confidence)
    for item, image, labels, *top in stream:
        write_outputs(item, image, names.apply(labels), len(names.classes))
        if confidence:
            write_confidence(item, top[0])
        result.append(item.mask)
    return result


def confidence_path(item: OutputItem) -> Path:
    return item.mask.with_name(item.mask.stem + "_confidence.png")


def write_confidence(item: OutputItem, top: np.ndarray) -> None:
    atomic_write_image(confidence_path(item), Image.fromarray((np.clip(top, 0, 1) * 255).round().astype(np.uint8)),
                       format="PNG")
