"""Cluster-based foreground extraction (CBFE) and community detection on co-occurrence (spec §2.3-2.8).

Pure functions on label maps (LongTensor h x w); every map here is at the reference's "eval size"
(nearest-resized), where pixel counts are taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError

# (d_row, d_col) of the 16 neighbour pairs of the reference's skimage GLCM call (spec §2.5): the list,
# not the angles it was meant to encode, is what the reference counted.
OFFSETS = (
    (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1),
    (0, 2), (1, 1), (2, 0), (1, -1), (0, -2), (-2, -1), (-2, 0), (-1, 1),
)


# ----------------------------------------------------------------------------- CBFE


def cluster_precision_scores(cluster_maps: Iterable[Tensor], foreground: Iterable[Tensor], k: int) -> Tensor:
    """s_c = mean, over the images where cluster c occurs, of |c ∩ fg| / |c| (0 where c never occurs)."""
    total = torch.zeros(k, dtype=torch.float64)
    images = torch.zeros(k, dtype=torch.float64)
    for clusters, fg in zip(cluster_maps, foreground):
        clusters = clusters.reshape(-1)
        size = torch.bincount(clusters, minlength=k).double()
        inside = torch.bincount(clusters, weights=fg.reshape(-1).double(), minlength=k)
        present = size > 0
        total[present] += inside[present] / size[present]
        images += present.double()
    return torch.where(images > 0, total / images.clamp_min(1), torch.zeros_like(total)).float()


def candidate_cuts(k: int) -> range:
    """The reference's cuts: ranks floor(0.55 k) ... floor(0.75 k) - 1 of the ascending scores."""
    return range(math.floor(0.55 * k), math.floor(0.75 * k))


def round_to_step(value: float, step: float = 0.05, top: float = 0.95) -> float:
    """The multiple of ``step`` in [0, top] nearest to ``value``."""
    grid = np.round(np.arange(0.0, top + step / 2, step), 10)
    return float(grid[np.abs(grid - value).argmin()])


def reference_threshold(
    scores: Tensor, cluster_maps: Sequence[Tensor], gt_foreground: Sequence[Tensor]
) -> tuple[float, int]:
    """(tau, best cut) of the reference (uses labels): the cut whose foreground best matches the
    ground truth (mean IoU over images), tau = its sorted score rounded to a multiple of 0.05."""
    order = scores.argsort()
    best_cut, best_iou = None, -1.0
    for cut in candidate_cuts(len(scores)):
        fg_set = torch.zeros(len(scores), dtype=torch.bool)
        fg_set[order[cut:]] = True
        ious = []
        for clusters, gt in zip(cluster_maps, gt_foreground):
            pred = fg_set[clusters]
            union = (pred | gt).sum()
            ious.append(float((pred & gt).sum()) / float(union) if union > 0 else 1.0)
        iou = float(np.mean(ious))
        if iou > best_iou:
            best_cut, best_iou = cut, iou
    if best_cut is None:
        raise ConfigError(f"the reference CBFE threshold needs k_fg >= 3 clusters, got {len(scores)}")
    return round_to_step(float(scores[order[best_cut]])), best_cut


def otsu_threshold(scores: Tensor) -> float:
    """Otsu's threshold of the cluster scores: the split of the sorted values that maximises the
    between-group variance; returns the smallest score of the upper group."""
    values = scores.double().sort().values
    n = len(values)
    if n < 2 or values[0] == values[-1]:
        return float(values[0]) if n else 0.0
    cum = torch.cumsum(values, 0)
    best, split = -1.0, 1
    for i in range(1, n):
        if values[i] == values[i - 1]:
            continue   # a threshold cannot separate equal scores
        w0, w1 = i / n, (n - i) / n
        m0, m1 = cum[i - 1] / i, (cum[-1] - cum[i - 1]) / (n - i)
        between = w0 * w1 * float(m0 - m1) ** 2
        if between > best:
            best, split = between, i
    return float(values[split])


# ----------------------------------------------------------------------------- co-occurrence graph


def pair_counts(labels: Tensor, n: int) -> Tensor:
    """n x n float64 counts of (label at p, label at p + offset) over the 16 offsets, both inside the
    map, diagonal zeroed (the reference's greycomatrix summed over distances and angles)."""
    labels = labels.long()
    h, w = labels.shape
    pairs = []
    for dr, dc in OFFSETS:
        r0, r1 = max(0, -dr), h - max(0, dr)
        c0, c1 = max(0, -dc), w - max(0, dc)
        if r1 <= r0 or c1 <= c0:
            continue
        a = labels[r0:r1, c0:c1]
        b = labels[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        pairs.append((a * n + b).reshape(-1))
    if not pairs:
        return torch.zeros(n, n, dtype=torch.float64)
    counts = torch.bincount(torch.cat(pairs), minlength=n * n).reshape(n, n).double()
    return counts.fill_diagonal_(0)


def cooccurrence(label_maps: Iterable[Tensor], n: int) -> Tensor:
    """A (n x n float64, spec §2.5): per image, neighbour-pair counts over the 16 offsets, diagonal
    zeroed, rows normalised; summed over images, row i divided by the images where it was non-empty."""
    total = torch.zeros(n, n, dtype=torch.float64)
    present = torch.zeros(n, dtype=torch.float64)
    for labels in label_maps:
        counts = pair_counts(labels, n)
        rows = counts.sum(1)
        nonempty = rows > 0
        total[nonempty] += counts[nonempty] / rows[nonempty, None]
        present += nonempty.double()
    return total / present.clamp_min(1)[:, None]


def similarity_weighted(a: Tensor, centroids: Tensor) -> Tensor:
    """A (n x n) times the cosine of the part centroids (k x d, k <= n), negative cosines as 0: parts
    that touch but look different link weakly. Labels past k (background) keep their weights."""
    k = len(centroids)
    unit = torch.nn.functional.normalize(centroids.double(), dim=1)
    sim = torch.ones_like(a)
    sim[:k, :k] = (unit @ unit.T).clamp_min(0)
    return a * sim


def build_graph(a: Tensor, weight_threshold: float) -> list[tuple[int, int, float]]:
    """Edges (i, j, w), i < j, where A[i, j] and A[j, i] both reach the threshold; w = their minimum."""
    low = torch.minimum(a, a.T)
    keep = torch.triu(low >= weight_threshold, diagonal=1)
    return [(int(i), int(j), float(low[i, j])) for i, j in keep.nonzero().tolist()]


def _louvain(edges, seed: int, resolution: float) -> dict[int, int]:
    import networkx as nx

    graph = nx.Graph()
    graph.add_weighted_edges_from(edges)
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    communities = sorted(communities, key=lambda c: (-len(c), min(c)))
    return {node: index + 1 for index, members in enumerate(communities) for node in members}


def _infomap(edges, number: int, markov_time: float, seed: int, trials: int) -> dict[int, int]:
    import infomap

    # serial trials and moves (Infomap's defaults, pinned): its OpenMP options would make the partition
    # depend on the machine's thread count
    result = infomap.run(
        edges, two_level=True, markov_time=markov_time, seed=seed, num_trials=trials,
        preferred_number_of_modules=number, inner_parallelization=False, parallel_trials=False,
    )
    return {int(node): int(module) for node, module in result.modules().items()}


def community_backend(requested: str) -> str:
    """The installed backend for ``requested`` (auto: Infomap, else networkx Louvain)."""
    import importlib.util

    have = {
        name: importlib.util.find_spec(mod) is not None
        for name, mod in (("infomap", "infomap"), ("louvain", "networkx"))
    }
    if requested == "auto":
        for name in ("infomap", "louvain"):
            if have[name]:
                return name
        raise ConfigError(
            "Leopart's community detection needs Infomap or networkx: pip install 'infomap>=2.16' "
            "(the reference) or 'networkx>=3' (Louvain fallback)"
        )
    if requested not in have:
        raise ConfigError(f"params.community must be auto, infomap or louvain, got {requested!r}")
    if not have[requested]:
        package = "infomap>=2.16" if requested == "infomap" else "networkx>=3"
        raise ConfigError(f"params.community={requested} needs {package}: pip install '{package}'")
    return requested


def reference_backend(requested: str) -> str:
    """Infomap, which the reference protocol needs (its seeds and forced module count are Infomap's)."""
    import importlib.util

    if requested == "louvain":
        raise ConfigError("params.protocol=reference runs Infomap, as the reference; params.community=louvain cannot")
    if importlib.util.find_spec("infomap") is None:
        raise ConfigError('params.protocol=reference needs Infomap, which is not installed: '
                          'pip install -e ".[leopart]"')
    return "infomap"


def backend_description(backend: str) -> str:
    """The backend and the version of the library that ran it, e.g. "infomap 2.16.0"."""
    from importlib.metadata import version

    return f"infomap {version('infomap')}" if backend == "infomap" else f"louvain (networkx {version('networkx')})"


def detect_communities(
    edges: list[tuple[int, int, float]],
    number: int,
    *,
    backend: str = "auto",
    markov_time: float = 1.0,
    seed: int = 1,
    trials: int = 1,
    resolution: float = 1.0,
) -> dict[int, int]:
    """node -> community id (1, 2, ...) for every node with an edge. Infomap (two-level, undirected,
    ``preferred_number_of_modules=number``; seeds start at 1) or networkx Louvain."""
    if not edges:
        return {}
    backend = community_backend(backend)
    if backend == "infomap":
        if seed < 1:
            raise ConfigError(f"Infomap seeds start at 1, got {seed}")
        return _infomap(edges, number, markov_time, seed, trials)
    return _louvain(edges, seed, resolution)


def limit_communities(
    modules: dict[int, int], edges: list[tuple[int, int, float]], number: int, sizes: Tensor | None = None
) -> dict[int, int]:
    """At most ``number`` communities, renumbered 1..m by decreasing size: while there are too many,
    the smallest (``sizes`` = pixels per node, else node count) joins the community it is most
    strongly linked to, or leaves the graph (label 0) when it has no link to another one."""
    groups: dict[int, set[int]] = {}
    for node, module in modules.items():
        groups.setdefault(module, set()).add(node)

    def size(members):
        return float(sizes[sorted(members)].sum()) if sizes is not None else float(len(members))

    while len(groups) > number:
        small = min(groups, key=lambda m: (size(groups[m]), m))
        owner = {node: m for m, members in groups.items() for node in members}
        links: dict[int, float] = {}
        for i, j, w in edges:
            a, b = owner.get(i), owner.get(j)
            if a is not None and b is not None and a != b and small in (a, b):
                other = b if a == small else a
                links[other] = links.get(other, 0.0) + w
        members = groups.pop(small)
        if links:
            groups[max(links, key=lambda m: (links[m], -m))] |= members
    ordered = sorted(groups.values(), key=lambda g: (-size(g), min(g)))
    return {node: index + 1 for index, members in enumerate(ordered) for node in members}


def community_table(n_labels: int, modules: dict[int, int]) -> Tensor:
    """Label -> community id; labels outside the graph get 0 (the reference's convention)."""
    table = torch.zeros(n_labels, dtype=torch.long)
    for node, module in modules.items():
        table[node] = module
    return table
