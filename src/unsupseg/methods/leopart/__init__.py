"""Leopart's fully unsupervised segmentation: CBFE + foreground over-clustering + community detection
(spec leopart.md §2), on the frozen features of any backbone.

Fit, on the training features only:
1. standardise + PCA (``pca_dim``) of all tokens;
2. noisy foreground per image: CLS attention for ViTs, feature distinctiveness for CNNs
   (``saliency``; see ``saliency.py``), both through the reference's mass procedure;
3. CBFE: spherical k-means (``k_fg``), each cluster scored by its mean precision against the noisy
   foreground, clusters scoring at least tau are foreground. tau is label-free by default (Otsu on the
   cluster scores, or a fixed ``cbfe_threshold``); ``reference_threshold`` reproduces the reference's
   choice from ground-truth masks (needs labelled training data);
4. L2 k-means (``k_cd``) of the foreground tokens; background tokens get the extra label ``k_cd``;
5. co-occurrence of the labels at ``map_size`` x ``map_size`` -> graph (edge weight min(A_ij, A_ji) >= wt)
   -> Infomap (networkx Louvain when Infomap is not installed) -> label-to-community table.

Labels: communities 1..clusters-1 and 0 for the clusters left out of the graph (no edge reaches wt),
as the reference's 20 + 1 labels for VOC's 21 classes; when no cluster is left out, ``clusters``
communities use ids 0..clusters-1. Which community is "background" is left to the Hungarian matching.

Deviations from the reference (documented in the presets): the reference clusters train+val jointly
(transductive) and picks val's foreground clusters from val's own saliency; here everything is
fitted on the training data, and a new image is segmented by assigning its tokens to the learned
centroids (fg clusters -> fg mask -> cd cluster -> community). Clustering runs at token resolution;
only the statistics (precision scores, co-occurrence) use the nearest-resized maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data import Preprocess
from ...config import check_clusters
from ...errors import ConfigError, DataError
from ...features.cache import default_cache_dir, open_or_build
from ...features.extract import batched_forward, iter_preprocessed
from ..base import FitContext, Predictor, PredictorInfo
from .clustering import PCA, assign, fit_pca, kmeans
from .merge import (
    build_graph,
    cluster_precision_scores,
    community_backend,
    community_table,
    cooccurrence,
    detect_communities,
    limit_communities,
    otsu_threshold,
    reference_threshold,
)
from .saliency import distinctiveness, mass_foreground

FOREGROUNDS = ("cbfe", "all")
SALIENCIES = ("auto", "attention", "distinctiveness")
COMMUNITIES = ("auto", "infomap", "louvain")


MIN_CLUSTERS = 2   # the merge step joins over-clusters into at least two groups


@dataclass
class Params:
    pca_dim: int = 50
    k_fg: int = 200                      # CBFE over-clustering (spherical k-means)
    k_cd: int = 149                      # foreground over-clustering (L2 k-means) = graph nodes
    markov_time: float = 2.0             # Infomap's markov time (mt)
    weight_threshold: float = 0.09       # co-occurrence edge threshold (wt)
    foreground: str = "cbfe"             # cbfe | all (every token is foreground: no CBFE)
    saliency: str = "auto"               # auto (attention for ViTs, else distinctiveness) | attention | distinctiveness
    saliency_mass: float = 0.65          # share of the blurred saliency kept as noisy foreground
    cbfe_threshold: float | None = None  # tau; None: Otsu on the cluster scores
    reference_threshold: bool = False    # the reference's tau from ground-truth masks (needs labels)
    map_size: int = 100                  # side of the maps the statistics are counted on
    community: str = "auto"              # auto (infomap, else louvain) | infomap | louvain
    trials: int = 1                      # Infomap trials (best code length kept)
    louvain_resolution: float = 1.0
    kmeans_iterations: int = 100
    kmeans_restarts: int = 5
    points_per_centroid: int = 256       # k-means trains on at most this many points per centroid

    def __post_init__(self) -> None:
        _check(self)


def _check(p: Params) -> None:
    for name in ("pca_dim", "k_fg", "k_cd", "map_size", "trials", "kmeans_iterations", "kmeans_restarts", "points_per_centroid"):
        if getattr(p, name) < 1:
            raise ConfigError(f"params.{name} must be >= 1, got {getattr(p, name)}")
    for name, value, options in (("foreground", p.foreground, FOREGROUNDS), ("saliency", p.saliency, SALIENCIES),
                                 ("community", p.community, COMMUNITIES)):
        if value not in options:
            raise ConfigError(f"params.{name} must be one of {', '.join(options)}, got {value!r}")
    if not 0 < p.saliency_mass <= 1:
        raise ConfigError(f"params.saliency_mass must be in (0, 1], got {p.saliency_mass}")
    if p.cbfe_threshold is not None and not 0 <= p.cbfe_threshold <= 1:
        raise ConfigError(f"params.cbfe_threshold must be in [0, 1] or null, got {p.cbfe_threshold}")
    if p.reference_threshold and p.cbfe_threshold is not None:
        raise ConfigError("params.reference_threshold and params.cbfe_threshold exclude each other; set one")
    if p.markov_time <= 0 or p.louvain_resolution <= 0 or p.weight_threshold < 0:
        raise ConfigError("params.markov_time and params.louvain_resolution must be > 0, params.weight_threshold >= 0")


def _resize(maps: Tensor, size: int) -> Tensor:
    """h x w map (any dtype) nearest-resized to size x size (PyTorch's legacy nearest, as Ref)."""
    return F.interpolate(maps[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(maps.dtype)


class _MeanAttention(nn.Module):
    """A ViT backbone seen as an extractor of its head-averaged CLS attention (1 x h x w)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.cls_attention(images).mean(1, keepdim=True)


def _attention_maps(ctx: FitContext, store) -> list[Tensor]:
    """Head-averaged CLS attention of every training image, through the feature cache."""
    net, cfg = ctx.backbone, ctx.config
    prep = Preprocess(cfg.data.resolution, mode=cfg.data.mode, interpolation=cfg.data.interpolation, multiple=net.stride)
    fields = {
        "kind": "leopart-cls-attention",
        "backbone": net.name,
        "weights": net.weights_id,
        "options": getattr(net, "options", {}),
        "preprocess": repr(prep),
        "dataset": getattr(ctx.dataset, "name", type(ctx.dataset).__name__),
        "fingerprint": ctx.dataset.fingerprint(),
    }

    def items():
        source = iter_preprocessed(ctx.dataset, prep, strict=cfg.data.strict)
        yield from batched_forward(_MeanAttention(net), source, cfg.batch_size)

    cache = open_or_build(cfg.cache_dir or default_cache_dir(), fields, items)
    if cache.ids != store.ids:
        raise DataError(f"the attention maps in {cache.path} do not cover the same images as the features in {store.path}")
    return [cache[i][0].float() for i in range(len(cache))]


def _noisy_foreground(ctx: FitContext, store, p: Params) -> list[Tensor]:
    kind = p.saliency
    if kind == "auto":
        kind = "attention" if hasattr(ctx.backbone, "cls_attention") else "distinctiveness"
    if kind == "attention":
        if not hasattr(ctx.backbone, "cls_attention"):
            raise ConfigError(f"params.saliency=attention needs a ViT backbone, got {ctx.config.backbone.name!r}")
        maps = _attention_maps(ctx, store)
    else:
        maps = [distinctiveness(store[i][None])[0] for i in range(len(store))]
    ctx.log(f"leopart: noisy foreground from {kind} (mass {p.saliency_mass})")
    return [mass_foreground(m[None], p.saliency_mass)[0] for m in maps]


def _cbfe(ctx: FitContext, store, p: Params, tokens: Tensor, shapes: list[tuple[int, int]]):
    """(fg mask per image, centroids, fg cluster set, cluster scores, tau)."""
    noisy = _noisy_foreground(ctx, store, p)
    centroids = kmeans(tokens, p.k_fg, spherical=True, generator=ctx.generator(1), iterations=p.kmeans_iterations,
                       restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid)
    labels = assign(tokens, centroids, spherical=True)[0]
    cluster_maps = [m.reshape(h, w) for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]
    small = [_resize(m, p.map_size) for m in cluster_maps]
    scores = cluster_precision_scores(small, (_resize(m, p.map_size) for m in noisy), p.k_fg)
    if p.reference_threshold:
        if store.label(0) is None:
            raise ConfigError("params.reference_threshold needs labelled training data (ground-truth masks)")
        # Ref: foreground = every pixel not labelled background (class 0); ignored pixels count as foreground
        gt = [_resize(store.label(i), p.map_size) != 0 for i in range(len(store))]
        tau, cut = reference_threshold(scores, small, gt)
        ctx.log(f"leopart: CBFE threshold {tau:.2f} from ground truth (cut {cut} of {p.k_fg})")
    elif p.cbfe_threshold is not None:
        tau = p.cbfe_threshold
    else:
        tau = otsu_threshold(scores)
    fg_set = scores >= tau
    if not fg_set.any():
        raise ConfigError(f"CBFE: no cluster scores >= {tau:.3f} (max {float(scores.max()):.3f}); lower params.cbfe_threshold")
    masks = [fg_set[m] for m in cluster_maps]
    return masks, centroids, fg_set, scores, tau


def fit(ctx: FitContext) -> dict[str, Tensor]:
    p: Params = ctx.params
    clusters = check_clusters(ctx.config.clusters, MIN_CLUSTERS)
    backend = community_backend(p.community)
    tic = time.perf_counter()
    store = ctx.features()
    n = len(store)
    shapes = [tuple(s[1:]) for s in store.shapes]
    pca = fit_pca(lambda: (store[i].float().flatten(1).T for i in range(n)), p.pca_dim)
    tokens = torch.cat([pca.transform(store[i].float().flatten(1).T) for i in range(n)])
    ctx.log(f"leopart: PCA {store.dim} -> {p.pca_dim} of {len(tokens)} tokens ({time.perf_counter() - tic:.0f} s)")

    if p.foreground == "cbfe":
        masks, fg_centroids, fg_set, scores, tau = _cbfe(ctx, store, p, tokens, shapes)
        share = float(torch.cat([m.reshape(-1) for m in masks]).float().mean())
        ctx.log(f"leopart: CBFE tau {tau:.3f}: {int(fg_set.sum())}/{p.k_fg} clusters, {100 * share:.1f}% of tokens "
                f"foreground ({time.perf_counter() - tic:.0f} s)")
    else:
        masks = [torch.ones(h, w, dtype=torch.bool) for h, w in shapes]
        fg_centroids, fg_set = torch.zeros(0, p.pca_dim), torch.zeros(0, dtype=torch.bool)
        scores, tau = torch.zeros(0), 0.0
    fg_flat = torch.cat([m.reshape(-1) for m in masks])
    if int(fg_flat.sum()) < p.k_cd:
        raise ConfigError(f"only {int(fg_flat.sum())} foreground tokens for params.k_cd={p.k_cd} clusters")
    cd_centroids = kmeans(tokens[fg_flat], p.k_cd, spherical=False, generator=ctx.generator(2),
                          iterations=p.kmeans_iterations, restarts=p.kmeans_restarts,
                          points_per_centroid=p.points_per_centroid)
    labels = torch.where(fg_flat, assign(tokens, cd_centroids, spherical=False)[0], p.k_cd)
    label_maps = [_resize(m.reshape(h, w), p.map_size) for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]

    n_labels = p.k_cd + 1
    a = cooccurrence(label_maps, n_labels)
    edges = build_graph(a, p.weight_threshold)
    sizes = torch.bincount(torch.cat([m.reshape(-1) for m in label_maps]), minlength=n_labels).double()
    in_graph = torch.zeros(n_labels, dtype=torch.bool)
    for i, j, _ in edges:
        in_graph[i] = in_graph[j] = True
    left_out = bool(((sizes > 0) & ~in_graph).any())
    # label 0 is reserved for clusters outside the graph only when there are some
    number = clusters - 1 if left_out else clusters
    modules = detect_communities(edges, number, backend=backend, markov_time=p.markov_time,
                                 seed=ctx.config.seed + 1, trials=p.trials, resolution=p.louvain_resolution)
    found = len(set(modules.values()))
    modules = limit_communities(modules, edges, number, sizes)
    table = community_table(n_labels, modules)
    if not left_out:
        table = (table - 1).clamp_min(0)
    ctx.log(f"leopart: {len(edges)} edges over {int(in_graph.sum())}/{n_labels} labels; {backend} found {found} "
            f"communities, kept {len(set(modules.values()))} ({time.perf_counter() - tic:.0f} s)")
    return {
        "pca_mean": pca.mean,
        "pca_std": pca.std,
        "pca_components": pca.components,
        "fg_centroids": fg_centroids,
        "fg_clusters": fg_set,
        "cluster_scores": scores,
        "fg_threshold": torch.tensor(float(tau)),
        "cd_centroids": cd_centroids,
        "communities": table,
    }


class LeopartPredictor(Predictor):
    """features -> standardise/PCA -> fg cluster -> fg mask -> cd cluster -> community, one-hot.

    The scores are discrete, so the Segmenter upsamples them (bilinear, then argmax) instead of
    the embedding."""

    upsample_scores = True

    def __init__(self, state: dict[str, Tensor], num_clusters: int):
        super().__init__()
        table = state["communities"].long()
        if int(table.max()) >= num_clusters:
            raise ConfigError(f"the run's community table uses {int(table.max()) + 1} labels, more than clusters={num_clusters}")
        self.num_clusters = num_clusters
        for name in ("pca_mean", "pca_std", "pca_components", "fg_centroids", "cd_centroids"):
            self.register_buffer(name, state[name].float())
        self.register_buffer("fg_clusters", state["fg_clusters"].bool())
        self.register_buffer("communities", table)

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
