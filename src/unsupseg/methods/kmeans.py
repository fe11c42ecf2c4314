"""Cosine k-means on frozen features: the baseline of every paper in the field.

k-means++ initialisation, several restarts (best objective kept), spherical updates (centroids
re-normalised), fitted on a seeded random subsample of the training tokens. Prediction: cosine of
each feature to each centroid, the similarity maps bilinearly upsampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_clusters
from ..errors import ConfigError
from .base import FitContext, Predictor, PredictorInfo, cosine_scores


@dataclass
class Params:
    restarts: int = 3
    iterations: int = 50
    max_samples: int = 200_000     # tokens drawn from the training features to fit on
    tolerance: float = 1e-6        # stop when the mean cosine objective improves less than this

    def __post_init__(self) -> None:
        for name in ("restarts", "max_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"params.{name} must be at least 1, got {getattr(self, name)}")
        if self.iterations < 0:   # 0: the k-means++ seeds alone (CAUSE seeds its centroids so)
            raise ConfigError(f"params.iterations must be >= 0, got {self.iterations}")
        if self.tolerance < 0:
            raise ConfigError(f"params.tolerance must be >= 0, got {self.tolerance}")


def gather_tokens(store, max_samples: int, generator: torch.Generator) -> torch.Tensor:
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
    for i in image_of.unique().tolist():
        local = chosen[image_of == i] - offsets[i]
        tokens.append(store[i].flatten(1).T[local].float())
    return F.normalize(torch.cat(tokens), dim=1)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    best = (x @ centroids.T).squeeze(1)
    for _ in range(1, k):
        dist = (1 - best).clamp_min(0) ** 2
        pick = torch.multinomial(dist + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        best = torch.maximum(best, (x @ x[pick].T).squeeze(1))
    return centroids


def spherical_kmeans(x: torch.Tensor, k: int, params: Params, generator: torch.Generator) -> torch.Tensor:
    """Best of ``params.restarts`` runs; returns k x D unit centroids. ``x`` rows are unit vectors."""
    best_obj, best = -float("inf"), None
    for _ in range(params.restarts):
        centroids = _kmeans_pp(x, k, generator)
        previous = -float("inf")
        for _ in range(params.iterations):
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
            if mean_obj - previous < params.tolerance:
                break
            previous = mean_obj
        final = float((x @ centroids.T).max(1).values.mean())
        if final > best_obj:
            best_obj, best = final, centroids
    return best


def fit(ctx: FitContext) -> dict[str, torch.Tensor]:
    params: Params = ctx.params
    store = ctx.features()
    tokens = gather_tokens(store, params.max_samples, ctx.generator(1))
    if ctx.config.clusters > len(tokens) == params.max_samples:
        raise ConfigError(f"clusters={ctx.config.clusters} is more than params.max_samples={params.max_samples}, "
                          "the tokens k-means is fitted on; raise params.max_samples or lower --clusters")
    check_clusters(ctx.config.clusters, tokens=len(tokens))
    ctx.log(f"k-means: {len(tokens)} tokens of dim {tokens.shape[1]}, K = {ctx.config.clusters}")
    centroids = spherical_kmeans(tokens, ctx.config.clusters, params, ctx.generator(2))
    return {"centroids": centroids.contiguous()}


class KMeansPredictor(Predictor):
    upsample_scores = True
    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centroids", centroids.float())

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return cosine_scores(embedding, self.centroids)


def build_predictor(params: Params, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
    return KMeansPredictor(state["centroids"])
