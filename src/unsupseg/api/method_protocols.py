"""Evaluation protocols of a method's own, by the name ``Method.evaluation_protocol`` gives for a run
(``evaluate`` dispatches to them): Leopart's reference protocol."""

from __future__ import annotations

import json
import os

import numpy as np
import torch.nn.functional as F

from .. import __version__, rundir
from .._io import atomic_write_text
from .._progress import track
from ..data import build_dataset
from ..errors import ConfigError
from ..evaluation.metrics import ConfusionMatrix, leopart_score
from ..features.extract import extract_features
from ..methods.leopart.method import REFERENCE_PROTOCOL
from .segmenter import Segmenter, fit_record, load


def evaluate_leopart_reference(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Leopart's fully unsupervised protocol (docs/methods/leopart.md §2.8-2.9) on a run fitted with
    ``params.protocol=reference``: the split's labels at map_size x map_size (its own foreground
    clusters, nearest-replicated pixels), one community table per Infomap seed, ground truth
    nearest-resized to map_size, Leopart's IoU-based Hungarian matching; mean and population std
    over the seeds (percent)."""
    seg = run if isinstance(run, Segmenter) else load(run)
    params = seg.params
    if split != params.eval_split:
        raise ConfigError(f"this run clustered {params.eval_split!r} together with its training data "
                          f"(params.protocol=reference); evaluate --split {params.eval_split}")
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = seg.eval_preprocess(data)
    store = extract_features(seg.backbone, data, prep, cache_dir=seg.config.cache_dir, batch_size=seg.config.batch_size,
                             strict=True, description=f"{split} features")
    size = params.map_size
    confusions = None
    for i in track(range(len(store)), len(store), f"evaluating {dataset}/{split} (Leopart reference protocol)"):
        maps = seg.predictor.reference_label_maps(store[i], size)
        label = F.interpolate(store.label(i)[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        if confusions is None:
            confusions = [ConfusionMatrix(seg.num_clusters, data.num_classes) for _ in range(len(maps))]
        for confusion, labels in zip(confusions, maps):
            confusion.update(labels, label)
    runs = [leopart_score(c, "hungarian-iou") for c in confusions]
    miou = np.array([100 * r.miou for r in runs])
    accuracy = np.array([100 * r.pixel_accuracy for r in runs])
    report = {
        "protocol": "leopart-reference",
        "matching": "hungarian-iou",
        "map_size": size,
        "dataset": dataset,
        "split": split,
        "n_images": len(store),
        "num_clusters": seg.num_clusters,
        "seeds": list(range(1, len(runs) + 1)),
        "miou": float(miou.mean()),
        "miou_std": float(miou.std()),
        "pixel_accuracy": float(accuracy.mean()),
        "pixel_accuracy_std": float(accuracy.std()),
        "per_seed": [{"seed": k + 1, "miou": float(m), "pixel_accuracy": float(a)}
                     for k, (m, a) in enumerate(zip(miou, accuracy))],
        "per_class_iou": {name: round(float(100 * np.mean([r.iou[c] for r in runs])), 4)
                          for c, name in enumerate(data.classes)},
        "fit_record": fit_record(seg),
        "unsupseg_version": __version__,
    }
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if seg.path is not None:
        rundir.update_meta(seg.path, **{f"metrics_{dataset}_{split}_reference": {
            "pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"], "miou_std": report["miou_std"]}})
    return report


METHOD_PROTOCOLS = {REFERENCE_PROTOCOL: evaluate_leopart_reference}
