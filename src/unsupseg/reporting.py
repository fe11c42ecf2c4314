"""``build_report``: run a fitted segmenter over a few images and write the HTML report of the run.

The driver sits at api level because it needs a model (``unsupseg.load``) and, for labelled data,
``unsupseg.evaluate``; the rendering itself is model-free (``unsupseg.evaluation.report``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__, rundir
from ._io import atomic_write_text, check_writable_file
from ._progress import console, track
from .api import SEGMENT_RECORD, Segmenter, build_train_dataset, evaluate, load, run_labels
from .api.outputs import run_identity
from .data import ImageFolder, build_dataset
from .errors import ConfigError, DataError
from .evaluation.report import ClusterGallery, ReportData, ReportImage, adjacency, render_report, top_neighbours

__all__ = ["build_report"]


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``: benchmark splits are often video sequences,
    so the first k frames would all look alike."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def build_report(
    run: str | os.PathLike | Segmenter,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str = "val",
    max_images: int = 24,
    crf: bool | None = None,
    matching: str | list[str] | None = None,
    patches_per_cluster: int = 8,
    patch_size: int = 64,
    masks: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a self-contained HTML report of a run to ``out`` (atomically) and return its path.

    Images: ``images`` (a folder or one file), else ``dataset``/``root``/``split``, else the run's
    own training data; at most ``max_images`` of them, spread over the set, are segmented and shown
    as overlays and feed the cluster gallery. When the dataset is a labelled benchmark, the metrics
    section comes from ``unsupseg.evaluate`` over the whole split (which also records them in the
    run's meta.json, as ``unsupseg evaluate`` does).

    ``masks``: a folder where ``segment`` wrote this run's masks of these images with the same CRF
    setting (its record says so); unlabelled images whose mask is there are shown from it instead of
    being segmented again, and their gallery patches are the points deepest inside each part.
    """
    log = log or (lambda msg: console.print(msg))
    if max_images < 1:
        raise ConfigError(f"max_images must be >= 1, got {max_images}")
    if images is not None and dataset is not None:
        raise ConfigError("give either --images DIR or --dataset NAME --root DIR, not both")
    check_writable_file(out, "report file")
    seg = run if isinstance(run, Segmenter) else load(run)
    config = seg.config
    data, bench, source = _report_images(config, images, dataset, root, split)

    metrics = None
    if bench is not None:
        log(f"evaluating on {bench[0]}/{bench[2]} ({len(data)} images) for the metrics section")
        # the predictions shown are scored, even for a run whose own protocol scores otherwise
        metrics = evaluate(seg, dataset=bench[0], root=bench[1], split=bench[2], crf=crf, matching=matching,
                           run_protocol=False, merges=False)   # the report shows clusters (with their names)
        prep = seg.eval_preprocess(data)   # as evaluate scores
    else:
        prep = seg.preprocess()   # as segment/predict see a photo

    reuse = _recorded_masks(seg, masks, config.test.crf if crf is None else crf) if metrics is None else None
    gallery = ClusterGallery(seg.num_clusters, per_cluster=patches_per_cluster, patch_size=patch_size)
    shown, reused = _segment_shown(seg, data, prep, gallery, max_images, crf, labelled=metrics is not None,
                                   reuse=reuse)
    if not shown:
        raise DataError(f"no image of {source} could be read for the report")

    meta = _read_meta(seg.path)
    test = config.test
    summary = [
        ("run", str(seg.path) if seg.path is not None else "(in memory)"),
        ("method", config.method),
        ("backbone", f"{config.backbone.name} (weights {seg.backbone.weights_id})"),
        ("clusters", f"{seg.num_clusters}" + (" (chosen by clusters auto)" if "clusters_auto" in meta else "")),
        ("trained on", _train_description(config, meta)),
        ("test recipe", f"{seg.resolution} px, flip {'on' if test.flip else 'off'}, "
                        f"CRF {'on' if (test.crf if crf is None else crf) else 'off'}"),
        ("images shown", f"{len(shown)} of {len(data)} ({source})"),
        ("generated", f"{time.strftime('%Y-%m-%d %H:%M')} by unsupseg {__version__}"),
    ]
    if "fit_seconds" in meta:
        summary.insert(5, ("fit time", f"{meta['fit_seconds']} s"))
    summary[5:5] = [(name.replace("_", " "), value) for name, value in meta.get("fit_record", {}).items()]
    notes = []
    if metrics is not None:
        notes.append(
            f"Cluster names come from {metrics.get('mapping_from', metrics['matching'])} matching of clusters to "
            f"classes on the "
            "whole split; the method never saw the labels."
        )
    title = f"unsupseg report: {Path(seg.path).name if seg.path is not None else config.method}"
    report = ReportData(
        title=title, num_clusters=seg.num_clusters, images=shown, gallery=gallery.rows(),
        pixel_share=gallery.pixel_share(), summary=summary, metrics=metrics, notes=notes,
        cluster_count=meta.get("clusters_auto"), **_naming_aids(seg, shown),
    )
    out = Path(out)
    atomic_write_text(out, render_report(report))
    reused_note = f" ({reused} from the masks in {reuse})" if reused else ""
    log(f"report of {len(shown)} images written to {out}{reused_note}")
    return out


def _report_images(config, images, dataset, root, split):
    """(data, (dataset, root, split) of a labelled benchmark to evaluate on or None, description)."""
    if images is not None:
        return ImageFolder(images, strict=config.data.strict), None, f"images in {images}"
    if dataset is not None:
        if root is None:
            raise ConfigError(f"dataset {dataset!r} needs --root (the folder that holds it)")
        data, bench, source = build_dataset(dataset, str(root), split), (dataset, root, split), f"{dataset}/{split}"
    else:
        try:
            data = build_train_dataset(config)
        except DataError as err:
            raise DataError(
                f"the run's training images cannot be read ({err}); pass --images DIR to show others"
            ) from None
        d = config.data
        if d.dataset and not d.crops and not d.images:
            bench, source = (d.dataset, d.root, d.split), f"training data {d.dataset}/{d.split}"
        else:
            bench, source = None, f"training data {d.crops or d.images}"
    if bench is not None and data.num_classes is None:
        bench = None   # a folder of images without class names: nothing to score against
    return data, bench, source


def _segment_shown(seg: Segmenter, data, prep, gallery: ClusterGallery, max_images: int, crf: bool | None,
                   labelled: bool, reuse: Path | None) -> tuple[list[ReportImage], int]:
    """At most ``max_images`` images spread over ``data``, segmented, or read from the masks in
    ``reuse`` where there is one; unreadable ones skipped with a warning (an error under data.strict).
    Each feeds the cluster gallery. Returns them and how many came from ``reuse``."""
    shown: list[ReportImage] = []
    reused = 0
    chosen = _spread(len(data), max_images)
    for i in track(chosen, len(chosen), "report: segmenting"):
        try:
            sample = data[i]
        except DataError as err:
            if seg.config.data.strict:
                raise
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=3)
            continue
        tensor, label = prep.apply(sample.image, sample.label if labelled else None)
        pixels = (tensor * 255).round().byte().permute(1, 2, 0).numpy()
        mask = reuse / f"{sample.id}.png" if reuse is not None else None
        if mask is not None and mask.is_file():
            labels = np.asarray(Image.open(mask).resize(pixels.shape[1::-1], Image.NEAREST)).astype(np.int64)
            gallery.add(pixels, _depth(labels, seg.num_clusters))
            reused += 1
        else:
            pred = seg.predict_tensor(tensor, crf=crf)
            labels = pred.labels
            gallery.add(pixels, pred.probabilities.numpy())
        shown.append(ReportImage(sample.id, pixels, labels, None if label is None else label.numpy()))
    return shown, reused


def _naming_aids(seg: Segmenter, shown: list[ReportImage]) -> dict:
    """The run's cluster names (merged clusters side by side), each cluster's most frequent neighbours
    in the images shown and, when the head has centroids, its nearest centroids."""
    k = seg.num_clusters
    labels = run_labels(seg)
    names: list[str | None] = [None] * k
    for group, name in zip(labels.groups, labels.classes):
        for c in group:
            names[c] = name if labels.names.get(c) or len(group) > 1 else None
    border = sum(adjacency(item.labels, k) for item in shown)
    centroids = getattr(seg.predictor, "centroids", None)
    similar = None
    if isinstance(centroids, torch.Tensor) and centroids.shape[0] == k:
        unit = torch.nn.functional.normalize(centroids.detach().float().cpu(), dim=1)
        similar = top_neighbours((unit @ unit.T).numpy())
    return {"names": names, "order": [c for group in labels.groups for c in group],
            "adjacent": top_neighbours(border, share=True), "similar": similar}


def _recorded_masks(seg: Segmenter, folder: str | os.PathLike | None, crf: bool) -> Path | None:
    """``folder`` when ``segment`` recorded there the masks of this very model and CRF setting."""
    if folder is None or not (Path(folder) / SEGMENT_RECORD).is_file():
        return None
    try:
        theirs = json.loads((Path(folder) / SEGMENT_RECORD).read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    mine = run_identity(seg, crf)
    same = (theirs.get("model_sha256"), theirs.get("crf")) == (mine["model_sha256"], mine["crf"])
    # masks of merged classes (labels.yaml) hold class ids, not the clusters the report shows
    clusters = theirs.get("classes") == mine["classes"] and len(mine["classes"]) == seg.num_clusters
    return Path(folder) if same and clusters else None


def _depth(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """C x H x W gallery scores of a mask: for each pixel of part c, d / (1 + d) with d its distance
    (pixels) to the nearest pixel of another part; 0 elsewhere. The gallery's peaks then sit deepest
    inside each part, where a segmenter's own probabilities peak too."""
    from scipy.ndimage import distance_transform_edt

    scores = np.zeros((num_clusters, *labels.shape), dtype=np.float32)
    for c in np.unique(labels):
        inside = labels == c
        d = distance_transform_edt(inside) if not inside.all() else np.full(labels.shape, float(max(labels.shape)))
        scores[c] = np.where(inside, d / (1 + d), 0)
    return scores


def _read_meta(path: Path | None) -> dict:
    if path is None or not (Path(path) / rundir.META).exists():
        return {}
    return json.loads((Path(path) / rundir.META).read_text())


def _train_description(config, meta: dict) -> str:
    train = meta.get("train_data") or {}
    d = config.data
    where = d.crops or d.images or (f"{d.dataset}/{d.split}" if d.dataset else "?")
    count = f", {train['images']} images" if "images" in train else ""
    return f"{where}{count}, {d.resolution} px"
