"""Leopart's noisy foreground and cluster-based foreground extraction (CBFE), from a fit's features."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data import Preprocess
from ...errors import ConfigError, DataError
from ...features.cache import default_cache_dir, open_or_build
from ...features.clustering import assign, kmeans
from ...features.extract import batched_forward, iter_preprocessed
from ...features.source import iter_maps
from ..base import FitContext
from .merge import cluster_precision_scores, otsu_threshold, reference_threshold
from .params import Params
from .saliency import distinctiveness, mass_foreground


def resize_nearest(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
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


def train_preprocess(ctx: FitContext) -> Preprocess:
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
        raise DataError(
            f"the attention maps in {cache.path} do not cover the same images as the features in {store.path}"
        )
    return [cache[i][0].float() for i in range(len(cache))]


def precomputed_foreground(folder: str | Path, split: str, n: int) -> list[Tensor]:
    """The reference's noisy foreground masks ``attn_dino_{split}.pt`` (N x 1 x H x W or N x H x W,
    non-zero = foreground, images in the split's order), read without unpickling code."""
    path = Path(folder) / f"attn_dino_{split}.pt"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist (params.saliency=precomputed reads attn_dino_{{split}}.pt from params.saliency_dir)"
        )
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


def noisy_foreground(ctx: FitContext, p: Params, store, dataset, prep: Preprocess, split: str) -> list[Tensor]:
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


def cbfe_tau(ctx: FitContext, p: Params, scores: Tensor, small: list[Tensor], store) -> float:
    """tau from the training scores: the reference's ground-truth cut, a fixed value or Otsu."""
    if p.reference_threshold:
        if store.label(0) is None:
            raise ConfigError("params.reference_threshold needs labelled training data (ground-truth masks)")
        # Ref: foreground = every pixel not labelled background (class 0); ignored pixels count as foreground
        gt = [resize_nearest(store.label(i), p.map_size) != 0 for i in range(len(store))]
        tau, cut = reference_threshold(scores, small, gt)
        ctx.log(f"leopart: CBFE threshold {tau:.2f} from ground truth (cut {cut} of {p.k_fg})")
        return tau
    if p.cbfe_threshold is not None:
        return p.cbfe_threshold
    return otsu_threshold(scores)


def cbfe(ctx: FitContext, store, p: Params, tokens: Tensor, shapes: list[tuple[int, int]]):
    """(fg mask per image, centroids, fg cluster set, cluster scores, tau)."""
    noisy = noisy_foreground(ctx, p, store, ctx.dataset, train_preprocess(ctx), ctx.config.data.split)
    centroids = kmeans(tokens, p.k_fg, spherical=True, generator=ctx.generator(1), iterations=p.kmeans_iterations,
                       restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid).float()
    labels = assign(tokens, centroids, spherical=True)[0]
    cluster_maps = [m.reshape(h, w) for m, (h, w) in zip(labels.split([h * w for h, w in shapes]), shapes)]
    small = [resize_nearest(m, p.map_size) for m in cluster_maps]
    scores = cluster_precision_scores(small, (resize_nearest(m, p.map_size) for m in noisy), p.k_fg)
    tau = cbfe_tau(ctx, p, scores, small, store)
    fg_set = scores >= tau
    if not fg_set.any():
        raise ConfigError(
            f"CBFE: no cluster scores >= {tau:.3f} (max {float(scores.max()):.3f}); lower params.cbfe_threshold"
        )
    masks = [fg_set[m] for m in cluster_maps]
    return masks, centroids, fg_set, scores, tau
