"""A training-free partition of one image from its own features: cosine k-means on its tokens.

The per-image counterpart of the dataset-level k-means baseline: the image's L2-normalised tokens are
clustered into K parts (k-means++ seeds, best of ``restarts`` spherical k-means runs, as
``spherical_kmeans``); nothing is learned from other images.

With ``clusters=None`` K is estimated from the image itself, from the modularity curve Q(K) of its
token graph (``cluster_count.estimate_clusters`` on a collection of one). Within one image that curve
rises with K up to the end of any range searched (every finer split of a photo is still spatially
coherent: on the six demo photos Q(12) - Q(11) > 0 every time), so the one-standard-error rule the
dataset estimate uses would always pick the largest K. The knee of the curve (Kneedle, Satopaa et
al. 2011, via the ``kneed`` package) is chosen instead: the K after which a further part adds
little modularity. A weak estimate: it chose 5 on each of eleven real photos (the six demo photos,
five CamVid frames) and on a synthetic photo of three regions (docs/segment-image.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster_count import ClusterCount, estimate_clusters
from .clustering import spherical_kmeans

# prototypes of the K estimate on one image: enough to be unions of parts, few enough that each
# prototype holds tokens of a 40 x 50 grid (the estimator's default of 100 needs >= 100 tokens)
PROTOTYPES = 60


CRITERION = "knee (Kneedle) of the modularity curve of the image's 4-neighbour token graph"


def knee(ks: list[int], scores: list[float]) -> int:
    """The knee of an increasing, concave Q(K) curve; the largest K searched when it has none (a
    straight line: every part adds as much as the last)."""
    from kneed import KneeLocator

    if len(ks) < 3:
        return ks[int(max(range(len(ks)), key=scores.__getitem__))]
    found = KneeLocator(ks, scores, curve="concave", direction="increasing").knee
    return int(found) if found is not None else ks[-1]


def partition_tokens(
    features: Tensor,
    clusters: int | None,
    generator: torch.Generator,
    *,
    k_range: tuple[int, int] = (2, 12),
    restarts: int = 5,
    iterations: int = 50,
) -> tuple[Tensor, ClusterCount | None]:
    """K x D unit centroids of the tokens of one D x h x w feature map, and the K estimate when
    ``clusters`` is None (searched in ``k_range``, inclusive)."""
    if features.ndim != 3:
        raise ValueError(f"expected one D x h x w feature map, got shape {tuple(features.shape)}")
    tokens = F.normalize(features.float().flatten(1).T, dim=1)
    count = None
    if clusters is None:
        prototypes = max(PROTOTYPES, k_range[1] + 1)
        if len(tokens) < prototypes:
            raise ValueError(f"the image has {len(tokens)} feature tokens, too few to estimate K (needs {prototypes}); "
                             "give the number of clusters")
        count = estimate_clusters([features], k_range, generator, prototypes=prototypes, images=1,
                                  tokens=len(tokens), resamples=3)
        count = dataclasses.replace(count, chosen=knee(count.ks, count.scores), criterion=CRITERION)
        clusters = count.chosen
    if not 1 <= clusters <= len(tokens):
        raise ValueError(f"{clusters} clusters need between 1 and the image's {len(tokens)} feature tokens")
    centroids = spherical_kmeans(tokens, clusters, generator, restarts=restarts, iterations=iterations)
    return centroids, count
