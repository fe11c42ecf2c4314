"""Leopart at test time: features -> PCA -> foreground cluster -> part cluster -> community."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...features.clustering import PCA, assign
from ..base import Predictor, PredictorInfo
from .params import Params
from .reference import reference_label_map


class LeopartPredictor(Predictor):
    """features -> standardise/PCA -> fg cluster -> fg mask -> cd cluster -> community, one-hot.

    The scores are discrete, so the Segmenter upsamples them (bilinear, then argmax) instead of
    the embedding."""

    upsample_scores = True

    def __init__(self, state: dict[str, Tensor], num_clusters: int):
        super().__init__()
        table = state["communities"].long()
        if int(table.max()) >= num_clusters:
            raise ConfigError(
                f"the run's community table uses {int(table.max()) + 1} labels, more than clusters={num_clusters}"
            )
        self.num_clusters = num_clusters
        for name in ("pca_mean", "pca_std", "pca_components", "fg_centroids", "cd_centroids"):
            self.register_buffer(name, state[name].float())
        self.register_buffer("fg_clusters", state["fg_clusters"].bool())
        self.register_buffer("communities", table)
        # protocol reference only: the eval split's own foreground clusters and one table per seed
        self.fg_clusters_eval = state["fg_clusters_eval"].bool() if "fg_clusters_eval" in state else None
        self.community_runs = state["community_runs"].long() if "community_runs" in state else None

    def reference_label_maps(self, features: Tensor, map_size: int) -> Tensor:
        """runs x map_size x map_size community ids of one image of the eval split (D x h x w
        features), one map per Infomap seed, as the reference protocol scores them."""
        if self.community_runs is None:
            raise ConfigError("this Leopart run was not fitted with params.protocol=reference")
        pca = PCA(self.pca_mean.cpu(), self.pca_std.cpu(), self.pca_components.cpu())
        labels = reference_label_map(pca, self.fg_centroids.cpu(), self.fg_clusters_eval, self.cd_centroids.cpu(),
                                     features.cpu(), map_size)
        return self.community_runs[:, labels]

    def embed(self, features: Tensor) -> Tensor:
        return PCA(self.pca_mean, self.pca_std, self.pca_components).transform_maps(features)

    def classify(self, embedding: Tensor) -> Tensor:
        b, d, h, w = embedding.shape
        tokens = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        if len(self.fg_centroids):
            fg = self.fg_clusters[assign(tokens, self.fg_centroids, spherical=True)[0]]
        else:
            fg = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
        k_cd = len(self.cd_centroids)
        labels = torch.where(fg, assign(tokens, self.cd_centroids, spherical=False)[0], k_cd)
        ids = self.communities[labels].reshape(b, h, w)
        return F.one_hot(ids, self.num_clusters).permute(0, 3, 1, 2).float()


def build_predictor(params: Params, state: dict[str, Tensor], info: PredictorInfo) -> Predictor:
    return LeopartPredictor(state, info.num_clusters)
