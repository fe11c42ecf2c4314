"""Nearest-neighbour images in feature space (STEGO's "kNN" partners, docs/methods/stego.md §3.2).

Each image gets one global descriptor: its feature map averaged over all spatial positions, then
L2-normalised. Neighbours are the images of highest cosine similarity, computed exactly in row and
column chunks (memory grows with ``chunk**2``, never with N x N), sorted by decreasing similarity; rank 0
is normally the image itself. The reference pools the head's channel-dropped features (its module is
never put in eval mode); we pool the dropout-free backbone features, so the table is deterministic and
independent of the head (the spec allows this choice).

The table is cached beside the features it was computed from (``<store.path>/knn_top<k>.npy``): the
feature-cache key already changes with the backbone, its weights, the preprocessing and the dataset,
so a cached table is reused exactly while those are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_path
from ..errors import ConfigError
from .cache import FeatureStore
from .source import iter_maps


def pooled_descriptors(store: FeatureStore) -> torch.Tensor:
    """N x D float32: every feature map averaged over its positions, L2-normalised."""
    desc = torch.empty(len(store), store.dim)
    for i, features in iter_maps(store):
        desc[i] = features.mean(dim=(1, 2))
    return F.normalize(desc, dim=1)


def knn_indices(desc: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """N x k int64: for each row of ``desc`` (unit vectors), the rows of highest dot product, best first.

    Exact; rows and columns are processed in blocks of ``chunk`` so memory stays O(chunk * (chunk + k)).
    """
    n = desc.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"cannot find {k} nearest neighbours among {n} images; need at least {k} images")
    if chunk < 1:
        raise ConfigError(f"kNN chunk size must be positive, got {chunk}")
    out = torch.empty(n, k, dtype=torch.int64)
    for r0 in range(0, n, chunk):
        rows = desc[r0 : r0 + chunk]
        best_val = torch.full((len(rows), 0), -float("inf"))
        best_idx = torch.empty((len(rows), 0), dtype=torch.int64)
        for c0 in range(0, n, chunk):
            sims = rows @ desc[c0 : c0 + chunk].T
            val, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            # merge this block's best with the running best: a row's top k is among their union
            val, pick = torch.cat([best_val, val], 1).topk(min(k, best_val.shape[1] + val.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + c0], 1).gather(1, pick)
            best_val = val
        out[r0 : r0 + len(rows)] = best_idx
    return out


def knn_table(store: FeatureStore, k: int = 30, chunk: int = 4096) -> tuple[torch.Tensor, bool]:
    """(N x k int64 neighbour table of ``store``, whether it came from the cache).

    Read from ``<store.path>/knn_top<k>.npy`` when present and well-formed, else computed and written
    there atomically.
    """
    n = len(store)
    if store.path is None:   # streamed features: computed, never written
        return knn_indices(pooled_descriptors(store), k, chunk), False
    path = store.path / f"knn_top{k}.npy"
    if path.exists():
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            table = None
        if (
            table is not None
            and table.shape == (n, k)
            and table.dtype == np.int64
            and n > 0
            and 0 <= table.min()
            and table.max() < n
        ):
            return torch.from_numpy(table), True
    table = knn_indices(pooled_descriptors(store), k, chunk)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table.numpy(), allow_pickle=False)
    return table, False


def sample_neighbours(table: torch.Tensor, indices: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """For each image in ``indices``, one neighbour drawn uniformly from ranks 1..k of ``table``
    (rank 0, normally the image itself, is never drawn)."""
    if not 1 <= k < table.shape[1]:
        raise ConfigError(f"kNN pool size k={k} must be between 1 and {table.shape[1] - 1}")
    ranks = torch.randint(1, k + 1, (len(indices),), generator=generator)
    return table[indices, ranks]
