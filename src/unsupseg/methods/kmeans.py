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
from ..features.clustering import gather_tokens, spherical_kmeans
from .base import FitContext, FitPlan, Method, Predictor, PredictorInfo, cosine_scores
from .registry import register_method


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


def fit(ctx: FitContext) -> dict[str, torch.Tensor]:
    params: Params = ctx.params
    store = ctx.features()
    tokens = gather_tokens(store, params.max_samples, ctx.generator(1))
    if ctx.config.clusters > len(tokens) == params.max_samples:
        raise ConfigError(f"clusters={ctx.config.clusters} is more than params.max_samples={params.max_samples}, "
                          "the tokens k-means is fitted on; raise params.max_samples or lower --clusters")
    check_clusters(ctx.config.clusters, tokens=len(tokens))
    ctx.log(f"k-means: {len(tokens)} tokens of dim {tokens.shape[1]}, K = {ctx.config.clusters}")
    centroids = spherical_kmeans(tokens, ctx.config.clusters, ctx.generator(2), restarts=params.restarts,
                                 iterations=params.iterations, tolerance=params.tolerance)
    return {"centroids": centroids.contiguous()}


def plan(params: Params, method: str, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
    return FitPlan([None], [], [("sampled tokens (float32)", min(tokens, params.max_samples) * dim * 4)],
                   [f"one pass over the features; {params.restarts} restarts x up to {params.iterations} iterations "
                    f"on {params.max_samples} sampled tokens"])


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


@register_method
class KMeans(Method):
    name = "kmeans"
    Params = Params

    def fit(self, ctx: FitContext) -> dict[str, torch.Tensor]:
        return fit(ctx)

    def build_predictor(self, params: Params, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
        return build_predictor(params, state, info)

    def plan(self, params: Params, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
        return plan(params, self.name, clusters, n_items, dim, tokens)
