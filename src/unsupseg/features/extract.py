"""Batched feature extraction through the on-disk cache."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch

from ..errors import DataError
from .cache import FeatureStore
from .source import open_features


def iter_preprocessed(
    dataset, preprocess, strict: bool = False
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(id, image 3 x H x W in [0, 1], label or None)``; unreadable images are skipped with a
    warning naming the file unless ``strict``."""
    for i in range(len(dataset)):
        try:
            sample = dataset[i]
        except DataError as err:
            if strict:
                raise
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            continue
        image, label = preprocess.apply(sample.image, sample.label)
        yield sample.id, image, label


def batched_forward(
    backbone, images, batch_size: int, flip: bool = False
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Run the backbone over ``(id, image, label)`` items, grouping consecutive same-sized images."""
    device = next(iter(backbone.buffers()), torch.empty(0)).device
    pending: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []

    def flush():
        batch = torch.stack([img for _, img, _ in pending]).to(device)
        if flip:
            batch = batch.flip(-1)
        feats = backbone(batch).float().cpu()
        out = [(pid, f, lab) for (pid, _, lab), f in zip(pending, feats)]
        pending.clear()
        return out

    for item in images:
        if pending and (item[1].shape != pending[0][1].shape or len(pending) == batch_size):
            yield from flush()
        pending.append(item)
    if pending:
        yield from flush()


def extract_features(
    backbone,
    dataset,
    preprocess,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    flip: bool = False,
    strict: bool = False,
    workers: int | None = None,
    description: str = "extracting features",
) -> FeatureStore:
    """Features of every image of ``dataset`` (D x h x w each), read from the cache when present.

    ``flip=True`` stores the features of the horizontally flipped images (for flip averaging);
    they are not flipped back. A cache hit never runs the backbone.
    """
    store, _ = open_features(backbone, dataset, preprocess, cache="always", cache_dir=cache_dir,
                             batch_size=batch_size, flip=flip, strict=strict, workers=workers,
                             log=lambda msg: None, warn=lambda msg: warnings.warn(msg, stacklevel=3),
                             description=description)
    return store
