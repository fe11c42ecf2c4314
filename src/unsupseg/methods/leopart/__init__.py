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

Two protocols (``params.protocol``):

- ``label-free`` (default): everything is fitted on the training data, and a new image is segmented
  by assigning its tokens to the learned centroids (fg clusters -> fg mask -> cd cluster ->
  community). Clustering runs at token resolution; only the statistics (precision scores,
  co-occurrence) use the nearest-resized maps. One community detection (best of ``trials``), and
  ``clusters`` communities when no cluster is left out of the graph.
- ``reference``: what the reference's ``fully_unsup_seg.py`` does, for reproducing its table. The
  training split and ``eval_split`` are clustered together (transductive: joint PCA, joint CBFE
  k-means, joint foreground over-clustering and co-occurrence); tau comes from the training scores
  and each split keeps the clusters whose own scores reach it (val's foreground from val's
  saliency); the foreground over-clustering runs on the ``map_size`` x ``map_size`` pixels whose PCA
  features are the nearest-replicated tokens (so pixels weigh by the area they cover), and the CBFE
  masks make the reference's round trip through the input size; Infomap runs once per seed 1..``runs``
  (the reference loops over seeds 0..9, which current Infomap rejects: seed must be >= 1), always
  asking for ``clusters - 1`` communities, label 0 for clusters outside the graph. ``unsupseg
  evaluate`` then scores ``eval_split`` as the reference does: label maps at ``map_size``, ground truth
  nearest-resized to it, Hungarian matching on IoU (Leopart's PredsmIoU), mean and std over the
  seeds. ``segment`` uses the first seed's communities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import check_clusters
from ...data import Preprocess, build_dataset
from ...errors import ConfigError, DataError
from ...features.cache import default_cache_dir, open_or_build
from ...features.extract import batched_forward, extract_features, iter_preprocessed
from ...features.clustering import PCA, assign, fit_pca, kmeans
from ...features.source import iter_maps
from ..base import FitContext, FitPlan, Predictor, PredictorInfo
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
SALIENCIES = ("auto", "attention", "distinctiveness", "precomputed")
PROTOCOLS = ("label-free", "reference")
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
                                         # | precomputed (binary masks DIR/attn_dino_{split}.pt, as the reference's)
    saliency_dir: str | None = None      # saliency: precomputed: the folder of attn_dino_{train,val}.pt
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
    protocol: str = "label-free"         # label-free | reference (the reference's transductive protocol)
    eval_split: str = "val"              # protocol reference: the split clustered with the training data
    runs: int = 10                       # protocol reference: Infomap seeds 1..runs, scores averaged

    def __post_init__(self) -> None:
        _check(self)


def _check(p: Params) -> None:
    for name in ("pca_dim", "k_fg", "k_cd", "map_size", "trials", "kmeans_iterations", "kmeans_restarts", "points_per_centroid",
                 "runs"):
        if getattr(p, name) < 1:
            raise ConfigError(f"params.{name} must be >= 1, got {getattr(p, name)}")
    for name, value, options in (("foreground", p.foreground, FOREGROUNDS), ("saliency", p.saliency, SALIENCIES),
                                 ("community", p.community, COMMUNITIES), ("protocol", p.protocol, PROTOCOLS)):
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
    if p.saliency == "precomputed" and not p.saliency_dir:
        raise ConfigError("params.saliency=precomputed needs params.saliency_dir (the folder of attn_dino_{split}.pt)")


def _resize(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """h x w map (any dtype) nearest-resized to size x size or (H, W) (PyTorch's legacy nearest, as Ref)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[None, None].float(), size=size, mode="nearest")[0, 0].to(maps.dtype)


class _MeanAttention(nn.Module):
    """A ViT backbone seen as an extractor of its head-averaged CLS attention (1 x h x w)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.cls_attention(images).mean(1, keepdim=True)


def _train_preprocess(ctx: FitContext) -> Preprocess:
    d = ctx.config.data
    return Preprocess(d.resolution, mode=d.mode, interpolation=d.interpolation, multiple=ctx.backbone.stride)


def _attention_maps(ctx: FitContext, dataset, prep: Preprocess, store) -> list[Tensor]:
    """Head-averaged CLS attention of every image of ``dataset``, through the feature cache."""
    net, cfg = ctx.backbone, ctx.config
    fields = {
        "kind": "leopart-cls-attention",
        "backbone": net.name,
        "weights": net.weights_id,
        "options": getattr(net, "options", {}),
        "preprocess": repr(prep),
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "fingerprint": dataset.fingerprint(),
    }

    def items():
        source = iter_preprocessed(dataset, prep, strict=cfg.data.strict)
        yield from batched_forward(_MeanAttention(net), source, cfg.batch_size)

    if store.path is None:   # streamed features (data.cache never or auto over budget): nothing is cached
        return [m[0].float() for _, m, _ in items()]
    cache = open_or_build(cfg.cache_dir or default_cache_dir(), fields, items)
    if cache.ids != store.ids:
        raise DataError(f"the attention maps in {cache.path} do not cover the same images as the features in {store.path}")
    return [cache[i][0].float() for i in range(len(cache))]


def precomputed_foreground(folder: str | Path, split: str, n: int) -> list[Tensor]:
    """The reference's noisy foreground masks ``attn_dino_{split}.pt`` (N x 1 x H x W or N x H x W,
    non-zero = foreground, images in the split's order), read without unpickling code."""
    path = Path(folder) / f"attn_dino_{split}.pt"
    if not path.is_file():
        raise DataError(f"{path} does not exist (params.saliency=precomputed reads attn_dino_{{split}}.pt from params.saliency_dir)")
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickle, zip or storage errors of torch.load
        raise DataError(f"cannot read {path}: {err}") from err
    if not isinstance(masks, Tensor) or masks.ndim not in (3, 4) or (masks.ndim == 4 and masks.shape[1] != 1):
        raise DataError(f"{path} must hold one N x 1 x H x W (or N x H x W) tensor of masks, got "
                        f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if len(masks) != n:
        raise DataError(f"{path} holds {len(masks)} masks but the {split} split has {n} images")
    return [m.reshape(m.shape[-2:]) != 0 for m in masks]


def _noisy_foreground(ctx: FitContext, p: Params, store, dataset, prep: Preprocess, split: str) -> list[Tensor]:
    kind = p.saliency
    if kind == "auto":
        kind = "attention" if hasattr(ctx.backbone, "cls_attention") else "distinctiveness"
    if kind == "precomputed":
        ctx.log(f"leopart: noisy foreground of {split} from {p.saliency_dir}")
        return precomputed_foreground(p.saliency_dir, split, len(store))
    if kind == "attention":
        if not hasattr(ctx.backbone, "cls_attention"):
            raise ConfigError(f"params.saliency=attention needs a ViT backbone, got {ctx.config.backbone.name!r}")
        maps = _attention_maps(ctx, dataset, prep, store)
    else:
        maps = [distinctiveness(m[None])[0] for _, m in iter_maps(store)]
    ctx.log(f"leopart: noisy foreground of {split} from {kind} (mass {p.saliency_mass})")
    return [mass_foreground(m[None], p.saliency_mass)[0] for m in maps]


def _threshold(ctx: FitContext, p: Params, scores: Tensor, small: list[Tensor], store) -> float:
    """tau from the training scores: the reference's ground-truth cut, a fixed value or Otsu."""
    if p.reference_threshold:
        if store.label(0) is None:
            raise ConfigError("params.reference_threshold needs labelled training data (ground-truth masks)")
        # Ref: foreground = every pixel not labelled background (class 0); ignored pixels count as foreground
        gt = [_resize(store.label(i), p.map_size) != 0 for i in range(len(store))]
        tau, cut = reference_threshold(scores, small, gt)
        ctx.log(f"leopart: CBFE threshold {tau:.2f} from ground truth (cut {cut} of {p.k_fg})")
        return tau
    if p.cbfe_threshold is not None:
        return p.cbfe_threshold
    return otsu_threshold(scores)


def _cbfe(ctx: FitContext, store, p: Params, tokens: Tensor, shapes: list[tuple[int, int]]):
    """(fg mask per image, centroids, fg cluster set, cluster scores, tau)."""
    noisy = _noisy_foreground(ctx, p, store, ctx.dataset, _train_preprocess(ctx), ctx.config.data.split)
    centroids = kmeans(tokens, p.k_fg, spherical=True, generator=ctx.generator(1), iterations=p.kmeans_iterations,
                       restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid)
    labels = assign(tokens, centroids, spherical=True)[0]
    cluster_maps = [m.reshape(h, w) for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]
    small = [_resize(m, p.map_size) for m in cluster_maps]
    scores = cluster_precision_scores(small, (_resize(m, p.map_size) for m in noisy), p.k_fg)
    tau = _threshold(ctx, p, scores, small, store)
    fg_set = scores >= tau
    if not fg_set.any():
        raise ConfigError(f"CBFE: no cluster scores >= {tau:.3f} (max {float(scores.max()):.3f}); lower params.cbfe_threshold")
    masks = [fg_set[m] for m in cluster_maps]
    return masks, centroids, fg_set, scores, tau


def plan(params: Params, method: str, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
    return FitPlan([None], [], [(f"every training token after PCA ({tokens} x {params.pca_dim} x 4 bytes)",
                                 tokens * params.pca_dim * 4)], ["two passes over the features for the PCA, one more to project"])


def fit(ctx: FitContext) -> dict[str, Tensor]:
    p: Params = ctx.params
    clusters = check_clusters(ctx.config.clusters, MIN_CLUSTERS)
    backend = community_backend(p.community)
    if p.protocol == "reference":
        return _fit_reference(ctx, p, clusters, backend)
    tic = time.perf_counter()
    store = ctx.features()
    shapes = [tuple(s[1:]) for s in store.shapes]
    pca = fit_pca(lambda: (m.flatten(1).T for _, m in iter_maps(store)), p.pca_dim)
    tokens = torch.cat([pca.transform(m.flatten(1).T) for _, m in iter_maps(store)])
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


# ----------------------------------------------------------------------------- protocol: reference


def reference_label_map(pca: PCA, fg_centroids: Tensor, fg_set: Tensor, cd_centroids: Tensor, features: Tensor,
                        stride: int, map_size: int) -> Tensor:
    """map_size x map_size labels (0..k_cd-1 foreground clusters, k_cd background) of one image's
    D x h x w features under the reference protocol: PCA tokens, CBFE foreground from the clusters in
    ``fg_set`` (none: all foreground) made at map_size and taken through the input size and back
    (the reference stores its CBFE masks at the input size), cd cluster of each nearest-replicated
    pixel (the cluster of its token)."""
    d, h, w = features.shape
    tokens = pca.transform(features.float().flatten(1).T)
    k_cd = len(cd_centroids)
    labels = _resize(assign(tokens, cd_centroids, spherical=False)[0].reshape(h, w), map_size)
    if len(fg_centroids) == 0:
        return labels
    fg = _resize(fg_set[assign(tokens, fg_centroids, spherical=True)[0]].reshape(h, w), map_size)
    fg = _resize(_resize(fg, (h * stride, w * stride)), map_size)
    return torch.where(fg, labels, k_cd)


def _fit_reference(ctx: FitContext, p: Params, clusters: int, backend: str) -> dict[str, Tensor]:
    """The reference's transductive protocol (module docstring): train + eval split clustered jointly."""
    cfg, stride = ctx.config, ctx.backbone.stride
    if not cfg.data.dataset or not cfg.data.root:
        raise ConfigError("params.protocol=reference clusters the training split together with params.eval_split: "
                          "it needs --dataset NAME --root DIR")
    if p.eval_split == cfg.data.split:
        raise ConfigError(f"params.eval_split must differ from the training split ({cfg.data.split!r})")
    tic = time.perf_counter()
    train = ctx.features()
    eval_data = build_dataset(cfg.data.dataset, cfg.data.root, p.eval_split)
    # the transform `unsupseg evaluate` uses for this split, so that it reads these features from the cache
    eval_prep = eval_data.eval_preprocess(cfg.test.resolution or cfg.data.resolution, multiple=stride,
                                          interpolation=cfg.test.interpolation)
    held = extract_features(ctx.backbone, eval_data, eval_prep, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
                            strict=True, description=f"{p.eval_split} features")
    stores, n_train = (train, held), len(train)
    items = [(s, i) for s in stores for i in range(len(s))]
    shapes = [tuple(s.shapes[i][1:]) for s, i in items]
    pca = fit_pca(lambda: (s[i].float().flatten(1).T for s, i in items), p.pca_dim)
    tokens = torch.cat([pca.transform(s[i].float().flatten(1).T) for s, i in items])
    ctx.log(f"leopart (reference protocol): PCA {train.dim} -> {p.pca_dim} of {len(tokens)} tokens of "
            f"{n_train} {cfg.data.split} + {len(held)} {p.eval_split} images ({time.perf_counter() - tic:.0f} s)")

    fg_centroids, fg_train, fg_eval = torch.zeros(0, p.pca_dim), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
    scores_train, scores_eval, tau = torch.zeros(0), torch.zeros(0), 0.0
    if p.foreground == "cbfe":
        noisy = (_noisy_foreground(ctx, p, train, ctx.dataset, _train_preprocess(ctx), cfg.data.split)
                 + _noisy_foreground(ctx, p, held, eval_data, eval_prep, p.eval_split))
        fg_centroids = kmeans(tokens, p.k_fg, spherical=True, generator=ctx.generator(1), iterations=p.kmeans_iterations,
                              restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid)
        labels = assign(tokens, fg_centroids, spherical=True)[0]
        small = [_resize(m.reshape(h, w), p.map_size) for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]
        noisy_small = [_resize(m, p.map_size) for m in noisy]
        scores_train = cluster_precision_scores(small[:n_train], noisy_small[:n_train], p.k_fg)
        scores_eval = cluster_precision_scores(small[n_train:], noisy_small[n_train:], p.k_fg)
        tau = _threshold(ctx, p, scores_train, small[:n_train], train)
        fg_train, fg_eval = scores_train >= tau, scores_eval >= tau
        if not fg_train.any() or not fg_eval.any():
            raise ConfigError(f"CBFE: no cluster scores >= {tau:.3f} in one split; lower params.cbfe_threshold")
        ctx.log(f"leopart: CBFE tau {tau:.3f}: {int(fg_train.sum())} {cfg.data.split} / {int(fg_eval.sum())} "
                f"{p.eval_split} foreground clusters of {p.k_fg} ({time.perf_counter() - tic:.0f} s)")

    # foreground over-clustering of the map_size^2 pixels: pixel -> the token it replicates
    offsets = torch.cumsum(torch.tensor([0] + [h * w for h, w in shapes]), 0)
    pixel_token = torch.stack([_resize(torch.arange(h * w).reshape(h, w), p.map_size) + offsets[k]
                               for k, (h, w) in enumerate(shapes)])
    if len(fg_centroids):
        fg_token = torch.cat([fg_train[labels[: offsets[n_train]]], fg_eval[labels[offsets[n_train]:]]])
        masks = torch.stack([_resize(_resize(_resize(fg_token[offsets[k]: offsets[k + 1]].reshape(h, w), p.map_size),
                                             (h * stride, w * stride)), p.map_size) for k, (h, w) in enumerate(shapes)])
    else:
        masks = torch.ones_like(pixel_token, dtype=torch.bool)
    fg_pixels = pixel_token[masks]
    if len(fg_pixels) < p.k_cd:
        raise ConfigError(f"only {len(fg_pixels)} foreground pixels for params.k_cd={p.k_cd} clusters")
    generator = ctx.generator(2)
    limit = p.points_per_centroid * p.k_cd
    if len(fg_pixels) > limit:   # faiss' training subsample, drawn among pixels
        fg_pixels = fg_pixels[torch.randperm(len(fg_pixels), generator=generator)[:limit]]
    cd_centroids = kmeans(tokens[fg_pixels], p.k_cd, spherical=False, generator=generator, iterations=p.kmeans_iterations,
                          restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid)
    label_maps = [reference_label_map(pca, fg_centroids, fg_train if k < n_train else fg_eval, cd_centroids, s[i], stride,
                                      p.map_size) for k, (s, i) in enumerate(items)]

    n_labels = p.k_cd + 1
    edges = build_graph(cooccurrence(label_maps, n_labels), p.weight_threshold)
    sizes = torch.bincount(torch.stack(label_maps).reshape(-1), minlength=n_labels).double()
    number = clusters - 1   # the reference asks for its 20 object classes; label 0 = outside the graph
    tables = []
    for seed in range(1, p.runs + 1):
        modules = detect_communities(edges, number, backend=backend, markov_time=p.markov_time, seed=seed, trials=1,
                                     resolution=p.louvain_resolution)
        found = len(set(modules.values()))
        if found > number:   # the reference's metric would refuse more labels than classes
            modules = limit_communities(modules, edges, number, sizes)
            ctx.log(f"leopart: seed {seed}: {backend} found {found} communities, merged into {number}")
        tables.append(community_table(n_labels, modules))
    ctx.log(f"leopart: {len(edges)} edges; {p.runs} {backend} runs ({time.perf_counter() - tic:.0f} s)")
    return {
        "pca_mean": pca.mean,
        "pca_std": pca.std,
        "pca_components": pca.components,
        "fg_centroids": fg_centroids,
        "fg_clusters": fg_train,
        "fg_clusters_eval": fg_eval,
        "cluster_scores": scores_train,
        "cluster_scores_eval": scores_eval,
        "fg_threshold": torch.tensor(float(tau)),
        "cd_centroids": cd_centroids,
        "communities": tables[0],
        "community_runs": torch.stack(tables),
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
        # protocol reference only: the eval split's own foreground clusters and one table per seed
        self.fg_clusters_eval = state["fg_clusters_eval"].bool() if "fg_clusters_eval" in state else None
        self.community_runs = state["community_runs"].long() if "community_runs" in state else None

    def reference_label_maps(self, features: Tensor, stride: int, map_size: int) -> Tensor:
        """runs x map_size x map_size community ids of one image of the eval split (D x h x w
        features), one map per Infomap seed, as the reference protocol scores them."""
        if self.community_runs is None:
            raise ConfigError("this Leopart run was not fitted with params.protocol=reference")
        pca = PCA(self.pca_mean.cpu(), self.pca_std.cpu(), self.pca_components.cpu())
        labels = reference_label_map(pca, self.fg_centroids.cpu(), self.fg_clusters_eval, self.cd_centroids.cpu(),
                                     features.cpu(), stride, map_size)
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
