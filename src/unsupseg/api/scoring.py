"""``evaluate``: a run scored on a labelled split (matching protocols, linear probe, over-clustering,
Leopart's reference protocol)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from .. import __version__, rundir
from .. import labels as labels_file
from .._io import atomic_write_text, check_writable_file
from .._progress import track
from ..data import build_dataset
from ..errors import ConfigError
from ..evaluation.metrics import PROTOCOLS, ConfusionMatrix, PerImageHungarian, score
from ..features.extract import extract_features
from ..methods.base import LinearProbe
from .method_protocols import METHOD_PROTOCOLS
from .segmenter import Segmenter, fit_record, load, run_labels

PROBES = ("clusters", "linear")


def linear_probe_segmenter(seg: Segmenter, state: dict[str, torch.Tensor] | None = None) -> Segmenter:
    """The Segmenter of a run's supervised linear probe: the method's embedding, then the probe's
    class logits (softmax of the logits themselves: alpha 1), for scoring with the identity mapping.
    ``state``: the run state (default: read from the Segmenter's run directory)."""
    import dataclasses

    config = seg.config
    keys = seg.method.LINEAR_PROBE
    if state is None:
        state = rundir.load(seg.path).state if seg.path is not None else {}
    if keys is None or not all(k in state for k in keys):
        has = "this method has no linear probe" if keys is None else (
            "the run holds no linear probe (it is trained only when the training data has labels)")
        raise ConfigError(f"--probe linear: {has}")
    weight, bias = (state[k] for k in keys)
    probe = LinearProbe(seg.predictor, weight, bias)
    probe_config = dataclasses.replace(
        config, clusters=int(weight.shape[0]), test=dataclasses.replace(config.test, alpha=1.0)
    )
    return Segmenter(probe_config, seg.backbone, probe, seg.device, seg.path, resolved=(seg.method, seg.params))


def _protocols(matching: str | Sequence[str] | None, num_clusters: int, num_classes: int) -> list[str]:
    """The evaluation protocols asked for, in order, without repeats ("all": every one; "hungarian":
    the dataset-wide one). Default: dataset-wide Hungarian, many-to-one when K > C as before."""
    if matching is None or matching == [] or matching == ():
        return ["dataset" if num_clusters <= num_classes else "many-to-one"]
    asked = [matching] if isinstance(matching, str) else list(matching)
    out: list[str] = []
    for name in asked:
        names = list(PROTOCOLS) if name == "all" else ["dataset" if name == "hungarian" else name]
        for n in names:
            if n not in PROTOCOLS:
                raise ConfigError(f"unknown matching {name!r}; choose from {', '.join(PROTOCOLS)} or all")
            if n not in out:
                out.append(n)
    return out


def evaluate(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    crf: bool | None = None,
    flip: bool | None = None,
    matching: str | Sequence[str] | None = None,
    probe: str = "clusters",
    run_protocol: bool = True,
    json_path: str | os.PathLike | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    merges: bool = True,
) -> dict:
    """Score a run on a labelled split under one or more protocols (``matching``: "dataset",
    "per-image", "many-to-one", a list of them or "all"; see ``evaluation.metrics``), all from one
    pass over the split.

    The top-level pixel_accuracy / miou / per_class_iou are those of the first protocol
    (``matching`` names it); ``protocols`` holds every one. ``mapping`` (cluster -> class, for the
    report's colours) is that of the first dataset-level protocol, else of the dataset-wide
    Hungarian matching.

    ``probe="linear"`` scores the run's supervised linear probe instead of its clusters (STEGO,
    CAUSE), with the identity mapping. A run whose method declares a protocol of its own
    (``Method.evaluation_protocol``; Leopart fitted with ``params.protocol=reference``: the reference's,
    ``evaluate_leopart_reference``) is scored by it unless ``run_protocol`` is False: then its
    predictions (as ``segment`` makes them) are scored like any run's.

    Images of the same size are scored ``batch_size`` at a time (default: the run's ``batch_size`` on
    a GPU, 1 on CPU; see ``Segmenter.batch_size``). ``precision`` (auto | bf16 | fp32) applies when
    ``run`` is a path.

    With the run's labels.yaml (and ``merges``), the classes it defines are scored instead of the
    clusters (merged clusters are one prediction); ``labels`` in the result holds their names and
    clusters, and ``mapping`` / ``confusion`` are per class.
    """
    if json_path is not None:
        check_writable_file(json_path, "--json file")
    seg = run if isinstance(run, Segmenter) else load(run, precision=precision)
    config = seg.config
    if probe not in PROBES:
        raise ConfigError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    own = seg.method.evaluation_protocol(seg.params)
    if run_protocol and probe == "clusters" and own is not None:
        return METHOD_PROTOCOLS[own](seg, dataset=dataset, root=root, split=split, json_path=json_path)
    crf = config.test.crf if crf is None else crf
    flip = config.test.flip if flip is None else flip
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    merged = run_labels(seg) if probe == "clusters" and merges else None
    seg, protocols = _scored(seg, probe, matching, dataset, data.num_classes,
                             len(merged.classes) if merged is not None else None)
    if merged is None:
        merged = labels_file.identity(seg.num_clusters)
    prep = seg.eval_preprocess(data)
    store, flipped = _split_features(seg, data, prep, split, flip)
    chunks = same_shape_chunks(store, batch_size or seg.batch_size)
    confusion, per_image = _confusion(seg, data, prep, store, flipped, crf, chunks, f"evaluating {dataset}/{split}",
                                      merged)
    report = {
        **_protocol_scores(confusion, per_image, protocols, data.classes),
        "n_images": len(store),
        "dataset": dataset,
        "split": split,
        "crf": crf,
        "flip": flip,
        "probe": probe,
        "num_clusters": seg.num_clusters,
        "confusion": confusion.matrix.tolist(),
        "fit_record": fit_record(seg),
        "unsupseg_version": __version__,
    }
    if merged != labels_file.identity(seg.num_clusters):
        report["labels"] = {"classes": merged.classes, "clusters": [list(g) for g in merged.groups]}
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if seg.path is not None:
        _record_metrics(seg.path, report, protocols)
    return report


def _split_features(seg: Segmenter, data, prep, split: str, flip: bool):
    """The split's cached features, and those of the flipped images when ``flip`` (else None)."""
    kwargs = dict(cache_dir=seg.config.cache_dir, batch_size=seg.config.batch_size, strict=True)
    store = extract_features(seg.backbone, data, prep, description=f"{split} features", **kwargs)
    if not flip:
        return store, None
    return store, extract_features(seg.backbone, data, prep, flip=True, description=f"{split} flipped", **kwargs)


def _record_metrics(path, report: dict, protocols: list[str]) -> None:
    """The scores of ``report`` in the run's meta.json, under a key naming the split, probe, CRF and labels."""
    key = (f"metrics_{report['dataset']}_{report['split']}{'_linear' if report['probe'] == 'linear' else ''}"
           f"{'_crf' if report['crf'] else ''}{'_labels' if 'labels' in report else ''}")
    rundir.update_meta(path, **{key: {
        "pixel_accuracy": report["pixel_accuracy"],
        "miou": report["miou"],
        "matching": protocols[0],
        "protocols": {name: {k: p[k] for k in ("pixel_accuracy", "miou")} for name, p in report["protocols"].items()},
    }})


def _scored(seg: Segmenter, probe: str, matching, dataset: str, num_classes: int,
            num_predicted: int | None = None) -> tuple[Segmenter, list[str]]:
    """The Segmenter scored (the run's, or its linear probe's) and the protocols it is scored by
    (``num_predicted``: the classes of the run's labels.yaml, default its clusters)."""
    if probe == "clusters":
        return seg, _protocols(matching, num_predicted or seg.num_clusters, num_classes)
    if matching:
        raise ConfigError("--probe linear predicts the classes themselves (identity mapping): leave out --matching")
    seg = linear_probe_segmenter(seg)
    if seg.num_clusters != num_classes:
        raise ConfigError(f"the linear probe predicts {seg.num_clusters} classes but {dataset} has {num_classes}")
    return seg, ["identity"]


def _confusion(seg: Segmenter, data, prep, store, flipped, crf: bool, chunks: list[list[int]], title: str,
               merged: labels_file.Labels):
    """The split's confusion matrix (predicted classes of ``merged`` x classes) and per-image matchings,
    one forward per chunk."""
    confusion = ConfusionMatrix(len(merged.classes), data.num_classes)
    lookup = torch.as_tensor(merged.lookup)
    per_image = PerImageHungarian(data.num_classes)
    for chunk in track(chunks, len(chunks), title):
        labels = store.labels(chunk)
        scores = seg.scores(store.batch(chunk), flipped.batch(chunk) if flipped is not None else None,
                            tuple(labels.shape[-2:]))
        images = torch.stack([prep.apply(data[i].image)[0] for i in chunk]) if crf else None
        probs = seg._finish(scores, images, crf)
        for pred, label in zip(probs.argmax(1), labels):
            per_image.add(confusion.update(lookup.to(pred.device)[pred], label))
    return confusion, per_image


def _protocol_scores(confusion: ConfusionMatrix, per_image: PerImageHungarian, protocols: list[str],
                     classes: list[str]) -> dict:
    """The report's scores: the first protocol's at the top level, every one under ``protocols``, and
    the cluster -> class ``mapping`` of the first dataset-level one (else dataset-wide Hungarian)."""
    matchings = {"dataset": "hungarian", "many-to-one": "many-to-one", "identity": "identity"}
    results = {
        name: per_image.scores() if name == "per-image" else score(confusion, matchings[name]) for name in protocols
    }
    mapping_from = next((n for n in protocols if n != "per-image"), "dataset")
    colours = results.get(mapping_from) or score(confusion, "hungarian")
    return {
        **results[protocols[0]].to_dict(classes),
        "matching": protocols[0],
        "mapping": colours.mapping,
        "mapping_from": mapping_from,
        "protocols": {name: {k: v for k, v in r.to_dict(classes).items() if k not in ("matching", "mapping")}
                      for name, r in results.items()},
    }


def same_shape_chunks(store, batch_size: int) -> list[list[int]]:
    """The store's indices in order, cut into runs of at most ``batch_size`` consecutive images with
    the same feature and label shapes (one forward each)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    chunks: list[list[int]] = []
    key = None
    for i in range(len(store)):
        shape = (store.shapes[i], store.label_shapes[i] if store.label_shapes is not None else None)
        if chunks and shape == key and len(chunks[-1]) < batch_size:
            chunks[-1].append(i)
        else:
            chunks.append([i])
            key = shape
    return chunks


def evaluate_overcluster(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    ks: Sequence[int] = (100, 300, 500),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Over-clustering protocol (Leopart, docs/protocols.md §6.4) on the run's backbone features of a split:
    standardise, PCA 50, k-means with each K, many-to-one matching; mean and std over seeds."""
    from ..evaluation.overcluster import overcluster_scores

    if json_path is not None:
        check_writable_file(json_path, "--json file")
    seg = run if isinstance(run, Segmenter) else load(run)
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = seg.eval_preprocess(data)
    store = extract_features(seg.backbone, data, prep, cache_dir=seg.config.cache_dir,
                             batch_size=seg.config.batch_size, strict=True, description=f"{split} features")
    labels = [store.label(i) for i in range(len(store))]
    results = {int(k): overcluster_scores(store, labels, data.num_classes, int(k), seeds=seeds) for k in ks}
    report = {"dataset": dataset, "split": split, "n_images": len(store), "backbone": seg.backbone.name,
              "matching": "many-to-one", "results": results}
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=float))
    return report
