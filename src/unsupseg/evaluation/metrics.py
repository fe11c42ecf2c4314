"""Segmentation metrics of the unsupervised protocol (docs/protocols.md §6).

A K x C confusion matrix (rows = predicted cluster, columns = true class) is accumulated over the
whole split, then matched once: Hungarian one-to-one when every cluster can get its own class,
many-to-one by majority (precision) for over-clustering, or the identity for linear probes.

``leopart_score`` is Leopart's own metric (its ``PredsmIoU``), for reproducing its protocol: matching
on IoU or precision scores instead of pixel counts, unmatched clusters mapped to class 0, and every
class in the mean (IoU 0 where a class has no pixel).

Evaluation protocols (``PROTOCOLS``, ``unsupseg evaluate --matching``):
  dataset      one Hungarian matching of the split's confusion matrix (STEGO, CAUSE, Leopart)
  per-image    a Hungarian matching per image (DiffCut's evaluation), see ``PerImageHungarian``
  many-to-one  each cluster to its majority class over the split (over-clustering protocols)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError

MATCHINGS = ("hungarian", "many-to-one", "identity")
PROTOCOLS = ("dataset", "per-image", "many-to-one")


def image_confusion(prediction, target, num_clusters: int, num_classes: int) -> np.ndarray:
    """K x C pixel counts of one prediction against its label (see ``ConfusionMatrix.update``)."""
    pred = torch.as_tensor(prediction).reshape(-1).long().cpu()
    true = torch.as_tensor(target).reshape(-1).long().cpu()
    if pred.shape != true.shape:
        raise ConfigError(f"prediction has {pred.numel()} pixels but the label has {true.numel()}")
    valid = (true >= 0) & (true < num_classes)
    pred, true = pred[valid], true[valid]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_clusters):
        raise ConfigError(
            f"prediction values must lie in [0, {num_clusters}), got range [{int(pred.min())}, {int(pred.max())}]"
        )
    counts = torch.bincount(pred * num_classes + true, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes).numpy().astype(np.int64)


class ConfusionMatrix:
    """Accumulates ``M[p, t]`` = number of pixels predicted ``p`` with ground truth ``t``.

    Pixels whose ground truth is outside ``[0, num_classes)`` (ignore = -1) are not counted;
    predictions are never dropped (a prediction outside ``[0, num_clusters)`` is an error).
    """

    def __init__(self, num_clusters: int, num_classes: int):
        if num_clusters < 1 or num_classes < 1:
            raise ConfigError(f"num_clusters and num_classes must be >= 1, got {num_clusters}, {num_classes}")
        self.num_clusters = num_clusters
        self.num_classes = num_classes
        self.matrix = np.zeros((num_clusters, num_classes), dtype=np.int64)

    def update(self, prediction, target) -> np.ndarray:
        """Adds one prediction; returns its own K x C matrix (for the per-image protocol)."""
        counts = image_confusion(prediction, target, self.num_clusters, self.num_classes)
        self.matrix += counts
        return counts

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix


def hungarian_mapping(matrix: np.ndarray) -> np.ndarray:
    """Cluster -> class map maximising matched pixels, one-to-one; unmatched clusters get -1."""
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping = np.full(matrix.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_mapping(matrix: np.ndarray) -> np.ndarray:
    """Each cluster goes to the class it overlaps most (precision); ties go to the lowest class id."""
    return np.argmax(matrix, axis=1).astype(np.int64)


@dataclass
class SegmentationScores:
    pixel_accuracy: float          # percent
    miou: float                    # percent, mean over classes whose IoU is defined
    per_class_iou: list[float | None]   # percent, None where undefined (0 / 0)
    mapping: list[int]             # cluster -> class (-1: unmatched, counted as wrong)
    matched_confusion: np.ndarray | None = field(repr=False)   # C x C after matching (None: per image)
    matching: str = "hungarian"

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        per_class = self.per_class_iou
        names = class_names or [str(i) for i in range(len(per_class))]
        return {
            "pixel_accuracy": round(self.pixel_accuracy, 4),
            "miou": round(self.miou, 4),
            "per_class_iou": {n: (None if v is None else round(v, 4)) for n, v in zip(names, per_class)},
            "matching": self.matching,
            "mapping": self.mapping,
        }


def score(confusion: ConfusionMatrix | np.ndarray, matching: str = "hungarian") -> SegmentationScores:
    """Match clusters to classes and compute pixel accuracy, mIoU and per-class IoU (in percent).

    ``hungarian`` with more clusters than classes matches C clusters one-to-one and counts the pixels
    of the others as wrong for their true class (never dropped, unlike STEGO's metric).
    """
    matrix = confusion.matrix if isinstance(confusion, ConfusionMatrix) else np.asarray(confusion, dtype=np.int64)
    num_clusters, num_classes = matrix.shape
    if matching == "hungarian":
        mapping = hungarian_mapping(matrix)
    elif matching == "many-to-one":
        mapping = majority_mapping(matrix)
    elif matching == "identity":
        if num_clusters != num_classes:
            raise ConfigError(
                f"identity matching needs as many clusters as classes, got {num_clusters} and {num_classes}"
            )
        mapping = np.arange(num_classes)
    else:
        raise ConfigError(f"unknown matching {matching!r}; choose one of {', '.join(MATCHINGS)}")

    matched = np.zeros((num_classes, num_classes), dtype=np.int64)
    for cluster, cls in enumerate(mapping):
        if cls >= 0:
            matched[cls] += matrix[cluster]
    unmatched = matrix[mapping < 0].sum(axis=0)      # wrong predictions for their true class

    tp = np.diag(matched).astype(np.float64)
    fp = matched.sum(axis=1) - tp
    fn = matched.sum(axis=0) + unmatched - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = matrix.sum()
    accuracy = float(tp.sum() / total) if total else float("nan")
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean()) if defined.any() else float("nan")
    return SegmentationScores(
        pixel_accuracy=100.0 * accuracy,
        miou=100.0 * miou,
        per_class_iou=[None if np.isnan(v) else 100.0 * float(v) for v in iou],
        mapping=[int(m) for m in mapping],
        matched_confusion=matched,
        matching=matching,
    )


LEOPART_MATCHINGS = ("hungarian-iou", "many-to-one-precision", "many-to-one-iou")


@dataclass
class LeopartScores:
    miou: float                    # fraction, mean over all classes
    pixel_accuracy: float          # fraction
    iou: np.ndarray                # C: tp / max(tp + fp + fn, 1e-8)
    tp: np.ndarray                 # C
    fp: np.ndarray                 # C
    fn: np.ndarray                 # C
    mapping: np.ndarray            # K: class of each cluster (unmatched clusters: class 0)
    scores: np.ndarray             # C x K: IoU (or precision) of class c with cluster k
    background_fraction: float     # Hungarian: 1 / C; many-to-one: share of the clusters mapped to class 0


def leopart_score(confusion: ConfusionMatrix | np.ndarray, matching: str = "hungarian-iou") -> LeopartScores:
    """Leopart's PredsmIoU on a K x C confusion matrix (docs/methods/leopart.md §2.9, §3.2).

    ``hungarian-iou``: linear_sum_assignment on 1 - IoU (classes x clusters), clusters left without a
    class go to class 0. ``many-to-one-*``: each cluster to the class of its highest precision / IoU
    (ties: lowest class).
    """
    matrix = confusion.matrix if isinstance(confusion, ConfusionMatrix) else np.asarray(confusion, dtype=np.int64)
    num_clusters, num_classes = matrix.shape
    tp_ck = matrix.T.astype(np.float64)                       # C x K overlaps
    cluster_size = matrix.sum(axis=1).astype(np.float64)[None, :]
    class_size = matrix.sum(axis=0).astype(np.float64)[:, None]
    if matching == "many-to-one-precision":
        scores = tp_ck / np.maximum(cluster_size, 1e-8)
    elif matching in ("hungarian-iou", "many-to-one-iou"):
        scores = tp_ck / np.maximum(cluster_size + class_size - tp_ck, 1e-8)
    else:
        raise ConfigError(f"unknown matching {matching!r}; choose one of {', '.join(LEOPART_MATCHINGS)}")
    if matching == "hungarian-iou":
        classes, clusters = linear_sum_assignment(1 - scores)
        mapping = np.zeros(num_clusters, dtype=np.int64)
        mapping[clusters] = classes
        background = 1 / num_classes
    else:
        mapping = np.argmax(scores, axis=0).astype(np.int64)
        background = float((mapping == 0).sum()) / num_clusters
    matched = np.zeros((num_classes, num_classes), dtype=np.int64)    # rows: predicted class
    np.add.at(matched, mapping, matrix)
    tp = np.diag(matched).copy()
    fp = matched.sum(axis=1) - tp
    fn = matched.sum(axis=0) - tp
    iou = tp / np.maximum((tp + fp + fn).astype(np.float64), 1e-8)
    total = matrix.sum()
    return LeopartScores(
        miou=float(iou.mean()), pixel_accuracy=float(tp.sum() / total) if total else float("nan"), iou=iou,
        tp=tp, fp=fp, fn=fn, mapping=mapping, scores=scores, background_fraction=background,
    )


class PerImageHungarian:
    """Per-image Hungarian protocol, as DiffCut's evaluation (``hungarian_matching`` in its
    tools/utils.py) computes it.

    Each image's K x C confusion matrix is matched on its own (one-to-one, maximising matched
    pixels). Per class c, over all images: TP_c += matched pixels of c; FP_c += pixels of the cluster
    matched to c that are not c; FN_c += pixels of c not in its matched cluster (pixels of clusters
    left unmatched in that image count here, as wrong for their true class). Then
    IoU_c = sum TP_c / (sum TP_c + sum FP_c + sum FN_c) (summed over images, not averaged per image),
    mIoU = mean of IoU_c over the classes where it is defined, pixel accuracy = sum TP / all labelled
    pixels.

    Only the classes present in an image (at least one labelled pixel) take part in its matching.
    DiffCut matches all C classes; a class absent from the image overlaps nothing, so which cluster
    it gets is a tie left to the solver, and when that cluster has pixels they become false
    positives of the absent class. Leaving absent classes out makes the score independent of the
    solver's tie-breaking; it differs from DiffCut's only in that case.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.tp = np.zeros(num_classes, dtype=np.int64)
        self.fp = np.zeros(num_classes, dtype=np.int64)
        self.fn = np.zeros(num_classes, dtype=np.int64)
        self.images = 0

    def add(self, matrix: np.ndarray) -> None:
        """One image's K x C confusion matrix (rows = clusters, columns = classes)."""
        m = np.asarray(matrix, dtype=np.int64)
        if m.ndim != 2 or m.shape[1] != self.num_classes:
            raise ConfigError(f"expected a K x {self.num_classes} confusion matrix, got shape {m.shape}")
        present = np.nonzero(m.sum(axis=0) > 0)[0]
        self.images += 1
        if not len(present):
            return
        clusters, classes = linear_sum_assignment(m[:, present].T, maximize=True)[::-1]
        classes = present[classes]
        tp = m[clusters, classes]
        self.tp[classes] += tp
        self.fp[classes] += m[clusters].sum(axis=1) - tp
        self.fn += m.sum(axis=0)
        self.fn[classes] -= tp

    def scores(self) -> SegmentationScores:
        union = (self.tp + self.fp + self.fn).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, self.tp / union, np.nan)
        total = self.tp.sum() + self.fn.sum()   # every labelled pixel is either TP or FN
        accuracy = float(self.tp.sum() / total) if total else float("nan")
        defined = ~np.isnan(iou)
        return SegmentationScores(
            pixel_accuracy=100.0 * accuracy,
            miou=100.0 * float(iou[defined].mean()) if defined.any() else float("nan"),
            per_class_iou=[None if np.isnan(v) else 100.0 * float(v) for v in iou],
            mapping=[],
            matched_confusion=None,
            matching="per-image",
        )
