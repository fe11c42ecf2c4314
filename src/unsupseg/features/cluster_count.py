"""How many categories? A label-free estimate of K from the training features (``clusters: auto``).

Criterion: the modularity (Newman & Girvan 2004) of the spatial token graph, maximised over K.

* Nodes: the tokens of the training maps; edges: the 4-neighbour pairs of the token grid. A semantic
  category is a set of regions: its tokens border each other far more often than their number alone
  predicts, and two categories border each other less. Modularity Q = sum_c (e_cc - a_c^2) measures
  exactly that (e_cc: share of neighbour pairs inside group c; a_c: share of pair ends in c).
* Partitions: the tokens are over-clustered into ``prototypes`` spherical k-means prototypes (many
  more than any K searched), and every candidate partition is a union of prototypes. Modularity of
  such a partition only needs the prototype x prototype neighbour counts, so the token graph is
  never held in memory. The prototypes are merged greedily by the largest modularity gain
  (Clauset, Newman & Moore 2004, "CNM"), which yields one partition, and its Q, for every K.
* Chosen K: Q(K) is averaged over a few resamples (token sample + prototypes); the smallest K whose
  mean Q is within one standard error of the maximum is chosen (the curve is flat near its top on
  real photos; the plain argmax would wander with the seed). The curve is saved with the run.

Why this one: the label-free criteria based on feature geometry alone (eigengap of a normalised
prototype affinity, silhouette, stability under resampling, the jump of the distortion) were tried
on CamVid's efficientnet_lite0 features and all chose 2 to 6, because a few large regions (road,
sky, buildings, trees) dominate the token mass and no gap separates the smaller categories in
feature space. Spatial coherence is what a segmentation category adds over a feature cluster, and
the modularity of the neighbour graph sees it: it chose 10 to 12 on CamVid (11 labelled classes).

Cost: one read of ``images`` cached feature maps (no backbone pass); per resample, k-means on
``tokens`` sampled tokens, one assignment of the maps' tokens and O(prototypes^3) merges: seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .clustering import assign, spherical_kmeans

CRITERION = "modularity of the 4-neighbour token graph (greedy CNM merging of over-clustered prototypes)"


@dataclass
class ClusterCount:
    chosen: int              # by the one-standard-error rule
    ks: list[int]            # the searched K, increasing
    scores: list[float]      # the criterion at each K: modularity, mean over the resamples
    score_se: list[float]    # its standard error over the resamples
    best: int                # argmax of the mean curve
    criterion: str
    prototypes: int
    images: int
    tokens: int              # tokens sampled per resample to fit the prototypes
    resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


def neighbour_counts(label_maps, n: int) -> np.ndarray:
    """Symmetric n x n counts of 4-neighbour pairs (horizontal and vertical, each pair counted once
    in each direction) between the labels of h x w integer maps."""
    counts = np.zeros(n * n, dtype=np.float64)
    for labels in label_maps:
        labels = np.asarray(labels, dtype=np.int64)
        for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
            pairs = np.concatenate([(a * n + b).ravel(), (b * n + a).ravel()])
            counts += np.bincount(pairs, minlength=n * n)
    return counts.reshape(n, n)


def greedy_modularity_curve(adjacency: np.ndarray) -> dict[int, float]:
    """Modularity of the partitions met while greedily merging the nodes of a weighted undirected
    graph (symmetric ``adjacency``, self-loops allowed), each step merging the two groups whose union
    raises Q the most (or lowers it the least): {number of groups: Q}, from n groups down to 1."""
    e = np.asarray(adjacency, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != e.shape[1] or not np.allclose(e, e.T):
        raise ValueError("adjacency must be a symmetric square matrix")
    total = e.sum()
    if total <= 0:
        raise ValueError("the graph has no edge")
    e = e / total
    a = e.sum(1)
    n = len(e)
    alive = np.ones(n, dtype=bool)
    q = float(np.trace(e) - (a * a).sum())
    curve = {n: q}
    for groups in range(n - 1, 0, -1):
        gain = 2 * (e - np.outer(a, a))          # Q change of merging i and j (i != j)
        gain[~alive] = -np.inf
        gain[:, ~alive] = -np.inf
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)   # first maximum: deterministic
        q += float(gain[i, j])
        e[i] += e[j]
        e[:, i] += e[:, j]
        e[j] = 0
        e[:, j] = 0
        a[i] += a[j]
        a[j] = 0
        alive[j] = False
        curve[groups] = q
    return curve


def estimate_clusters(
    store,
    k_range: tuple[int, int],
    generator: torch.Generator,
    *,
    prototypes: int = 100,
    images: int = 80,
    tokens: int = 10_000,
    resamples: int = 5,
) -> ClusterCount:
    """K in ``k_range`` (inclusive) for the feature maps of ``store`` (anything with ``len`` and
    ``store[i] -> D x h x w``); see the module docstring.

    ``resamples`` independent token samples and prototype sets give as many Q(K) curves; their mean
    is the criterion and the chosen K is the smallest whose mean Q is within one standard error of
    the maximum (the "one-standard-error rule", Hastie, Tibshirani & Friedman, ESL 7.10): Q(K) is
    flat around its maximum on real photos, where the plain argmax would wander with the seed.
    """
    low, high = k_range
    if not 1 <= low <= high:
        raise ValueError(f"the K range must satisfy 1 <= low <= high, got {low}, {high}")
    if high >= prototypes:
        raise ValueError(f"the K range must stay below the {prototypes} prototypes, got up to {high}")
    chosen_images = torch.randperm(len(store), generator=generator)[:images].sort().values.tolist()
    shapes, flat = [], []
    for i in chosen_images:
        m = store[i]
        shapes.append(tuple(m.shape[1:]))
        flat.append(F.normalize(m.float().flatten(1).T, dim=1).half())   # half: the pool stays small
    flat = torch.cat(flat)
    if len(flat) < prototypes:
        raise ValueError(f"{len(flat)} tokens are too few for {prototypes} prototypes")
    ks = list(range(low, high + 1))
    curves = []
    for _ in range(max(resamples, 1)):
        sample = flat[torch.randperm(len(flat), generator=generator)[:tokens]].float()
        centroids = spherical_kmeans(sample, prototypes, generator, restarts=1, iterations=20)
        labels = assign(flat, centroids, spherical=True)[0].split([h * w for h, w in shapes])
        label_maps = [lab.reshape(h, w).numpy() for lab, (h, w) in zip(labels, shapes)]
        curve = greedy_modularity_curve(neighbour_counts(label_maps, prototypes))
        curves.append([curve[k] for k in ks])
    curves = np.asarray(curves)
    mean = curves.mean(0)
    se = curves.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
    best = int(np.argmax(mean))
    chosen = ks[int(np.nonzero(mean >= mean[best] - se[best])[0][0])]
    return ClusterCount(chosen=chosen, ks=ks, scores=mean.tolist(), score_se=se.tolist(), best=ks[best],
                        criterion=CRITERION, prototypes=prototypes, images=len(shapes), tokens=len(sample),
                        resamples=len(curves))
