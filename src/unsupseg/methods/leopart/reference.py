"""Leopart's reference protocol (``params.protocol=reference``): the training split and the eval
split clustered together, as the reference's ``fully_unsup_seg.py`` does."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ...data import build_dataset
from ...errors import ConfigError
from ...features.clustering import PCA, assign, kmeans
from ...features.extract import extract_features
from ..base import FitContext
from .foreground import cbfe_tau, noisy_foreground, resize_nearest, train_preprocess
from .merge import (
    build_graph,
    cluster_precision_scores,
    community_table,
    cooccurrence,
    detect_communities,
    limit_communities,
)
from .params import Params
from .tokens import fit_stable_pca, pca_tokens


def reference_label_map(pca: PCA, fg_centroids: Tensor, fg_set: Tensor, cd_centroids: Tensor, features: Tensor,
                        map_size: int) -> Tensor:
    """map_size x map_size labels (0..k_cd-1 foreground clusters, k_cd background) of one image's
    D x h x w features under the reference protocol: PCA tokens, CBFE foreground from the clusters in
    ``fg_set`` (none: all foreground) and cd cluster of each nearest-replicated pixel (the cluster of
    its token), both at map_size as the reference builds and uses them."""
    d, h, w = features.shape
    tokens = pca_tokens(pca, features.flatten(1).T)
    k_cd = len(cd_centroids)
    labels = resize_nearest(assign(tokens, cd_centroids, spherical=False)[0].reshape(h, w), map_size)
    if len(fg_centroids) == 0:
        return labels
    fg = resize_nearest(fg_set[assign(tokens, fg_centroids, spherical=True)[0]].reshape(h, w), map_size)
    return torch.where(fg, labels, k_cd)


def _joint_items(ctx: FitContext, p: Params):
    """(training store, eval store, eval dataset, eval transform): the two splits clustered together."""
    cfg, stride = ctx.config, ctx.backbone.stride
    if not cfg.data.dataset or not cfg.data.root:
        raise ConfigError("params.protocol=reference clusters the training split together with params.eval_split: "
                          "it needs --dataset NAME --root DIR")
    if p.eval_split == cfg.data.split:
        raise ConfigError(f"params.eval_split must differ from the training split ({cfg.data.split!r})")
    train = ctx.features()
    eval_data = build_dataset(cfg.data.dataset, cfg.data.root, p.eval_split)
    # the transform `unsupseg evaluate` uses for this split, so that it reads these features from the cache
    eval_prep = eval_data.eval_preprocess(cfg.test.resolution or cfg.data.resolution, multiple=stride,
                                          interpolation=cfg.test.interpolation)
    held = extract_features(ctx.backbone, eval_data, eval_prep, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
                            strict=True, description=f"{p.eval_split} features")
    return train, held, eval_data, eval_prep


def _joint_cbfe(ctx: FitContext, p: Params, tokens: Tensor, shapes, train, held, eval_data, eval_prep) -> dict:
    """CBFE on both splits' tokens: one spherical k-means, tau from the training scores, each split's
    foreground clusters from its own scores."""
    cfg, n_train = ctx.config, len(train)
    noisy = (noisy_foreground(ctx, p, train, ctx.dataset, train_preprocess(ctx), cfg.data.split)
             + noisy_foreground(ctx, p, held, eval_data, eval_prep, p.eval_split))
    centroids = kmeans(tokens, p.k_fg, spherical=True, generator=ctx.generator(1), iterations=p.kmeans_iterations,
                       restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid).float()
    labels = assign(tokens, centroids, spherical=True)[0]
    small = [resize_nearest(m.reshape(h, w), p.map_size)
             for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]
    noisy_small = [resize_nearest(m, p.map_size) for m in noisy]
    scores_train = cluster_precision_scores(small[:n_train], noisy_small[:n_train], p.k_fg)
    scores_eval = cluster_precision_scores(small[n_train:], noisy_small[n_train:], p.k_fg)
    tau = cbfe_tau(ctx, p, scores_train, small[:n_train], train)
    fg_train, fg_eval = scores_train >= tau, scores_eval >= tau
    if not fg_train.any() or not fg_eval.any():
        raise ConfigError(f"CBFE: no cluster scores >= {tau:.3f} in one split; lower params.cbfe_threshold")
    ctx.log(f"leopart: CBFE tau {tau:.3f}: {int(fg_train.sum())} {cfg.data.split} / {int(fg_eval.sum())} "
            f"{p.eval_split} foreground clusters of {p.k_fg}")
    fg_token = torch.cat([fg_train[labels[: sum(h * w for h, w in shapes[:n_train])]],
                          fg_eval[labels[sum(h * w for h, w in shapes[:n_train]):]]])
    return {"fg_centroids": centroids, "fg_train": fg_train, "fg_eval": fg_eval, "scores_train": scores_train,
            "scores_eval": scores_eval, "tau": tau, "fg_token": fg_token}


def _pixel_overclustering(ctx: FitContext, p: Params, tokens: Tensor, shapes, fg_token: Tensor | None) -> Tensor:
    """k_cd centroids of the foreground over-clustering of the map_size^2 pixels, each pixel carrying
    the PCA features of the token it replicates (``fg_token`` None: every token is foreground)."""
    offsets = torch.cumsum(torch.tensor([0] + [h * w for h, w in shapes]), 0)
    pixel_token = torch.stack([resize_nearest(torch.arange(h * w).reshape(h, w), p.map_size) + offsets[k]
                               for k, (h, w) in enumerate(shapes)])
    if fg_token is not None:
        masks = torch.stack([resize_nearest(fg_token[offsets[k]: offsets[k + 1]].reshape(h, w), p.map_size)
                             for k, (h, w) in enumerate(shapes)])
    else:
        masks = torch.ones_like(pixel_token, dtype=torch.bool)
    fg_pixels = pixel_token[masks]
    if len(fg_pixels) < p.k_cd:
        raise ConfigError(f"only {len(fg_pixels)} foreground pixels for params.k_cd={p.k_cd} clusters")
    generator = ctx.generator(2)
    limit = p.points_per_centroid * p.k_cd
    if len(fg_pixels) > limit:   # faiss' training subsample, drawn among pixels
        fg_pixels = fg_pixels[torch.randperm(len(fg_pixels), generator=generator)[:limit]]
    return kmeans(tokens[fg_pixels], p.k_cd, spherical=False, generator=generator, iterations=p.kmeans_iterations,
                  restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid).float()


def _community_runs(ctx: FitContext, p: Params, label_maps: list[Tensor], clusters: int, backend: str) -> Tensor:
    """runs x (k_cd + 1) label -> community tables, one per Infomap seed 1..runs."""
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
    ctx.log(f"leopart: {len(edges)} edges; {p.runs} {backend} runs")
    return torch.stack(tables)


def fit_reference(ctx: FitContext, p: Params, clusters: int, backend: str) -> dict[str, Tensor]:
    """The reference's transductive protocol (module docstring): train + eval split clustered jointly."""
    tic = time.perf_counter()
    train, held, eval_data, eval_prep = _joint_items(ctx, p)
    items = [(s, i) for s in (train, held) for i in range(len(s))]
    shapes = [tuple(s.shapes[i][1:]) for s, i in items]
    pca = fit_stable_pca(lambda: (s[i].float().flatten(1).T for s, i in items), p.pca_dim)
    tokens = torch.cat([pca_tokens(pca, s[i].flatten(1).T) for s, i in items])
    ctx.log(f"leopart (reference protocol): PCA {train.dim} -> {p.pca_dim} of {len(tokens)} tokens of "
            f"{len(train)} {ctx.config.data.split} + {len(held)} {p.eval_split} images "
            f"({time.perf_counter() - tic:.0f} s)")
    none = torch.zeros(0, dtype=torch.bool)
    fg = {"fg_centroids": torch.zeros(0, p.pca_dim), "fg_train": none, "fg_eval": none, "scores_train": torch.zeros(0),
          "scores_eval": torch.zeros(0), "tau": 0.0, "fg_token": None}
    if p.foreground == "cbfe":
        fg = _joint_cbfe(ctx, p, tokens, shapes, train, held, eval_data, eval_prep)
    cd_centroids = _pixel_overclustering(ctx, p, tokens, shapes, fg["fg_token"])
    label_maps = [reference_label_map(pca, fg["fg_centroids"], fg["fg_train"] if k < len(train) else fg["fg_eval"],
                                      cd_centroids, s[i], p.map_size) for k, (s, i) in enumerate(items)]
    tables = _community_runs(ctx, p, label_maps, clusters, backend)
    ctx.log(f"leopart (reference protocol): fitted in {time.perf_counter() - tic:.0f} s")
    return {
        "pca_mean": pca.mean,
        "pca_std": pca.std,
        "pca_components": pca.components,
        "fg_centroids": fg["fg_centroids"].float(),
        "fg_clusters": fg["fg_train"],
        "fg_clusters_eval": fg["fg_eval"],
        "cluster_scores": fg["scores_train"],
        "cluster_scores_eval": fg["scores_eval"],
        "fg_threshold": torch.tensor(float(fg["tau"])),
        "cd_centroids": cd_centroids.float(),
        "communities": tables[0].clone(),   # safetensors refuses tensors that share memory
        "community_runs": tables,
    }
