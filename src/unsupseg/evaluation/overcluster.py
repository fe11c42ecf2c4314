"""Leopart's over-clustering evaluation of dense features (docs/methods/leopart.md §3.2, docs/protocols.md §6.4).

Tokens of every image of the split are standardised and reduced by PCA (fitted on those tokens:
the protocol is transductive), clustered by L2 k-means into K clusters, the cluster maps
nearest-upsampled to the label size and matched to the classes many-to-one by precision (each
cluster goes to its majority class) before the mIoU over the whole split. Mean and population std
over several k-means seeds. Pure: it knows no model, only features and labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..features.clustering import assign, fit_pca, kmeans
from .metrics import ConfusionMatrix, score


def _nearest(label: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def overcluster_scores(
    features: Sequence[Tensor],
    labels: Sequence[Tensor],
    num_classes: int,
    k: int,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    pca_dim: int = 50,
    *,
    size: int | None = None,
    matching: str | None = None,
    iterations: int = 100,
    restarts: int = 5,
    points_per_centroid: int = 256,
) -> dict:
    """Over-clustering scores of ``features`` (D x h x w per image; a list or a FeatureStore) against
    ``labels`` (H x W per image, -1 = ignore).

    ``size``: None compares at the label size; an int resizes cluster maps and labels (nearest) to
    size x size, as the reference (100). ``matching``: None = many-to-one, or Hungarian when
    k == num_classes (the reference's direct clustering). k-means as faiss: ``restarts`` runs of
    ``iterations`` on at most ``points_per_centroid * k`` tokens. Returns mIoU and pixel accuracy (%)
    as mean and std over ``seeds``, with the per-seed values.
    """
    n = len(features)
    if n == 0 or len(labels) != n:
        raise ConfigError(f"over-clustering needs one label per feature map, got {n} maps and {len(labels)} labels")
    if k < 1 or num_classes < 1 or not seeds:
        raise ConfigError(
            f"over-clustering needs k >= 1, num_classes >= 1 and at least one seed, got {k}, {num_classes}, {seeds}"
        )
    matching = matching or ("hungarian" if k == num_classes else "many-to-one")
    shapes = [tuple(features[i].shape[-2:]) for i in range(n)]
    pca = fit_pca(lambda: (features[i].float().flatten(1).T for i in range(n)), pca_dim)
    tokens = torch.cat([pca.transform(features[i].float().flatten(1).T) for i in range(n)])
    targets = [torch.as_tensor(labels[i]).long() for i in range(n)]
    if size is not None:
        targets = [_nearest(t, (size, size)) for t in targets]
    runs = []
    for seed in seeds:
        centroids = kmeans(tokens, k, spherical=False, generator=torch.Generator().manual_seed(int(seed)),
                           iterations=iterations, restarts=restarts, points_per_centroid=points_per_centroid)
        clusters = assign(tokens, centroids, spherical=False)[0].split([h * w for h, w in shapes])
        confusion = ConfusionMatrix(k, num_classes)
        for (h, w), cluster, target in zip(shapes, clusters, targets):
            confusion.update(_nearest(cluster.reshape(h, w), tuple(target.shape)), target)
        result = score(confusion, matching)
        runs.append({"seed": int(seed), "miou": result.miou, "pixel_accuracy": result.pixel_accuracy})
    miou = np.array([r["miou"] for r in runs])
    acc = np.array([r["pixel_accuracy"] for r in runs])
    return {
        "k": k,
        "matching": matching,
        "pca_dim": pca_dim,
        "n_images": n,
        "miou": float(miou.mean()),
        "miou_std": float(miou.std()),
        "pixel_accuracy": float(acc.mean()),
        "pixel_accuracy_std": float(acc.std()),
        "per_seed": runs,
    }
