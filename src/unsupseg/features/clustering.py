"""Generic clustering tools shared by the methods and the evaluation: PCA, two k-means, token sampling.

Two k-means because two references are reproduced: Leopart's (faiss, below) and the cosine k-means
baseline (``spherical_kmeans``: k-means++ seeds, empty clusters take the worst-represented token as
scikit-learn does, stop when the mean cosine improves less than ``tolerance``).

Standardise + PCA and faiss-style k-means, in torch (Leopart's reference uses sklearn and faiss).

PCA follows the reference: every dimension standardised (mean 0, population std 1; a constant
dimension keeps scale 1, as sklearn's StandardScaler), then plain centred PCA without whitening.
The covariance is accumulated over all tokens in two passes (mean, then centred products), so the
data never has to fit in memory at full width.

k-means follows faiss' ``Kmeans``: training on a seeded random subsample of at most
``points_per_centroid * k`` points, random initial centroids, ``restarts`` runs keeping the best
objective, empty clusters split off a populated one. ``spherical`` re-normalises the centroids after
every update and assigns by maximum inner product; the data themselves are not normalised (faiss'
spherical mode). Iterations stop early only at an exact fixed point (no assignment changed), which
gives the same centroids as running them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .source import iter_maps

_CHUNK = 32768   # rows per assignment block: bounds the N x K score matrix


@dataclass
class PCA:
    mean: Tensor         # D
    std: Tensor          # D
    components: Tensor   # P x D, orthonormal rows, decreasing explained variance

    def transform(self, x: Tensor) -> Tensor:
        """N x D -> N x P, in the dtype of the components."""
        return ((x.to(self.components.dtype) - self.mean) / self.std) @ self.components.T

    def transform_maps(self, maps: Tensor) -> Tensor:
        """B x D x h x w -> B x P x h x w."""
        x = (maps.float() - self.mean[:, None, None]) / self.std[:, None, None]
        return torch.einsum("bdhw,pd->bphw", x, self.components)


def fit_pca(chunks: Callable[[], Iterable[Tensor]], dim: int, dtype: torch.dtype = torch.float32) -> PCA:
    """PCA of standardised rows; ``chunks()`` yields N_i x D tensors and is called twice. ``dtype``:
    of the centred products and of the result (float64: the products no longer depend on how BLAS
    orders its sums, which varies with the CPU and the thread count, beyond float64 rounding)."""
    total, count = None, 0
    for x in chunks():
        x = x.double()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
    if total is None or count < 2:
        raise ValueError("PCA needs at least two rows")
    mean = total / count
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64)
    mean_d = mean.to(dtype)
    for x in chunks():
        xc = x.to(dtype) - mean_d
        cov += (xc.T @ xc).double()     # products of centred rows in dtype, summed in float64
    cov /= count
    std = cov.diagonal().sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    corr = cov / std[:, None] / std[None, :]
    if dim > len(mean):
        raise ValueError(f"PCA to {dim} dimensions needs features of at least that width, got {len(mean)}")
    values, vectors = torch.linalg.eigh(corr)
    components = vectors[:, values.argsort(descending=True)[:dim]].T
    # a fixed sign per component (largest entry positive), so results do not depend on the solver
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PCA(mean.to(dtype), std.to(dtype), components.to(dtype).contiguous())


def assign(x: Tensor, centroids: Tensor, spherical: bool) -> tuple[Tensor, Tensor]:
    """(cluster index, objective per point): max inner product (spherical) or min squared L2; in
    float64 when ``x`` or ``centroids`` is float64, else float32."""
    labels, objective = [], []
    dtype = torch.float64 if torch.float64 in (x.dtype, centroids.dtype) else torch.float32
    centroids = centroids.to(dtype)
    c_norm = (centroids * centroids).sum(1)
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK].to(dtype)
        dots = block @ centroids.T
        if spherical:
            best, idx = dots.max(1)
        else:
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change the argmin
            part, idx = (c_norm - 2 * dots).min(1)
            best = (part + (block * block).sum(1)).clamp_min(0)
        labels.append(idx)
        objective.append(best)
    return torch.cat(labels), torch.cat(objective)


def _split_empty(centroids: Tensor, sizes: Tensor, generator: torch.Generator) -> None:
    """faiss' fix for empty clusters: copy a populated centroid (picked with probability
    proportional to its size - 1) and push the two copies symmetrically apart."""
    eps = 1.0 / 1024
    for j in (sizes == 0).nonzero().flatten().tolist():
        weights = (sizes - 1).clamp_min(0).double()
        if weights.sum() == 0:
            return
        m = int(torch.multinomial(weights, 1, generator=generator))
        sign = torch.ones(centroids.shape[1], dtype=centroids.dtype)
        sign[1::2] = -1
        centroids[j] = centroids[m] * (1 + eps * sign)
        centroids[m] = centroids[m] * (1 - eps * sign)
        sizes[j] = sizes[m] // 2
        sizes[m] -= sizes[j]


def kmeans(
    x: Tensor,
    k: int,
    *,
    spherical: bool,
    generator: torch.Generator,
    iterations: int = 100,
    restarts: int = 5,
    points_per_centroid: int = 256,
) -> Tensor:
    """k x d centroids of the rows of ``x`` (see the module docstring); float64 ``x`` is clustered in
    float64, anything else in float32."""
    if k < 1 or len(x) < k:
        raise ValueError(f"k-means with k={k} needs at least k points, got {len(x)}")
    x = x if x.dtype == torch.float64 else x.float()
    if len(x) > points_per_centroid * k:
        x = x[torch.randperm(len(x), generator=generator)[: points_per_centroid * k]]
    best, best_obj = None, None
    for _ in range(max(restarts, 1)):
        centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
        if spherical:
            centroids = F.normalize(centroids, dim=1)
        previous = None
        for _ in range(iterations):
            labels, _ = assign(x, centroids, spherical)
            if previous is not None and torch.equal(labels, previous):
                break
            previous = labels
            sizes = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            centroids = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centroids)
            _split_empty(centroids, sizes, generator)
            if spherical:
                centroids = F.normalize(centroids, dim=1)
        objective = float(assign(x, centroids, spherical)[1].double().sum())
        better = best_obj is None or (objective > best_obj if spherical else objective < best_obj)
        if better:
            best, best_obj = centroids, objective
    return best.contiguous()


def gather_tokens(store, max_samples: int, generator: torch.Generator) -> Tensor:
    """Up to ``max_samples`` L2-normalised tokens drawn uniformly from all maps of ``store``."""
    counts = torch.tensor([s[1] * s[2] for s in store.shapes])
    total = int(counts.sum())
    if total > max_samples:
        chosen = torch.randperm(total, generator=generator)[:max_samples].sort().values
    else:
        chosen = torch.arange(total)
    offsets = torch.cumsum(counts, 0) - counts
    image_of = torch.searchsorted(offsets, chosen, right=True) - 1
    tokens = []
    for i, features in iter_maps(store, image_of.unique().tolist()):
        local = chosen[image_of == i] - offsets[i]
        tokens.append(features.flatten(1).T[local].float())
    return F.normalize(torch.cat(tokens), dim=1)


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    best = (x @ centroids.T).squeeze(1)
    for _ in range(1, k):
        dist = (1 - best).clamp_min(0) ** 2
        pick = torch.multinomial(dist + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        best = torch.maximum(best, (x @ x[pick].T).squeeze(1))
    return centroids


def spherical_kmeans(
    x: Tensor, k: int, generator: torch.Generator, *, restarts: int, iterations: int, tolerance: float = 1e-6
) -> Tensor:
    """The baseline's cosine k-means (see the module docstring): best of ``restarts`` runs; returns
    k x D unit centroids. ``x`` rows are unit vectors."""
    best_obj, best = -float("inf"), None
    for _ in range(restarts):
        centroids = kmeans_pp(x, k, generator)
        previous = -float("inf")
        for _ in range(iterations):
            sims = x @ centroids.T
            objective, assign = sims.max(1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            empty = torch.bincount(assign, minlength=k) == 0
            # an empty cluster takes the worst-represented token, as scikit-learn does
            if empty.any():
                worst = objective.argsort()[: int(empty.sum())]
                sums[empty] = x[worst]
            centroids = F.normalize(sums, dim=1)
            mean_obj = float(objective.mean())
            if mean_obj - previous < tolerance:
                break
            previous = mean_obj
        final = float((x @ centroids.T).max(1).values.mean())
        if final > best_obj:
            best_obj, best = final, centroids
    return best
