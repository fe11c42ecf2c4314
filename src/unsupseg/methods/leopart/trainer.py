"""Leopart's fit: the label-free protocol here, the reference's transductive one in ``reference``."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ...config import check_clusters
from ...errors import ConfigError
from ...features.clustering import assign, kmeans
from ...features.source import iter_maps
from ..base import FitContext, FitPlan
from .foreground import cbfe, resize_nearest
from .merge import (
    backend_description,
    build_graph,
    community_backend,
    community_table,
    cooccurrence,
    detect_communities,
    limit_communities,
    reference_backend,
    similarity_weighted,
)
from .params import MIN_CLUSTERS, Params, resolve_protocol
from .reference import fit_reference
from .tokens import fit_stable_pca, pca_tokens


def plan(params: Params, method: str, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
    return FitPlan([None], [], [(f"every training token after PCA ({tokens} x {params.pca_dim} x 8 bytes)",
                                 tokens * params.pca_dim * 8)],
                   ["two passes over the features for the PCA, one more to project"])


def fit(ctx: FitContext) -> dict[str, Tensor]:
    p, notes = resolve_protocol(ctx.params)
    clusters = check_clusters(ctx.config.clusters, MIN_CLUSTERS)
    backend = reference_backend(p.community) if p.protocol == "reference" else community_backend(p.community)
    ctx.record["community_detection"] = backend_description(backend)
    if p.protocol == "reference":
        ctx.log(f"leopart: protocol reference: {'; '.join(notes)}")
        return fit_reference(ctx, p, clusters, backend)
    tic = time.perf_counter()
    store = ctx.features()
    shapes = [tuple(s[1:]) for s in store.shapes]
    pca = fit_stable_pca(lambda: (m.flatten(1).T for _, m in iter_maps(store)), p.pca_dim)
    tokens = torch.cat([pca_tokens(pca, m.flatten(1).T) for _, m in iter_maps(store)])
    ctx.log(f"leopart: PCA {store.dim} -> {p.pca_dim} of {len(tokens)} tokens ({time.perf_counter() - tic:.0f} s)")

    if p.foreground == "cbfe":
        masks, fg_centroids, fg_set, scores, tau = cbfe(ctx, store, p, tokens, shapes)
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
                          points_per_centroid=p.points_per_centroid).float()   # as stored: test time assigns alike
    labels = torch.where(fg_flat, assign(tokens, cd_centroids, spherical=False)[0], p.k_cd)
    label_maps = [resize_nearest(m.reshape(h, w), p.map_size)
                  for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]

    n_labels = p.k_cd + 1
    a = cooccurrence(label_maps, n_labels)
    if p.graph == "cooccurrence-similarity":
        a = similarity_weighted(a, cd_centroids)
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
        "fg_centroids": fg_centroids.float(),
        "fg_clusters": fg_set,
        "cluster_scores": scores,
        "fg_threshold": torch.tensor(float(tau)),
        "cd_centroids": cd_centroids.float(),
        "communities": table,
    }
