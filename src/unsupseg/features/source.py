"""Where training features come from: the on-disk cache, or the frozen backbone on every batch.

Both sources give the same read interface, so a method cannot tell them apart:
  ``len(src)``, ``src.ids``, ``src.dim``, ``src.shapes`` (D x h x w per item, known before reading),
  ``src.label_shapes`` (None without labels), ``src[i]``, ``src.batch(indices)`` (B x D x h x w
  float32), ``src.label(i)``, ``src.labels(indices)``, ``src.maps(indices)`` (a sequential pass),
  ``src.path`` (the cache entry, where derived tables may be cached; None when streaming), ``src.hit``.
The streamed features are rounded to float16 as the cache stores them, so the numbers agree too.

``data.cache``: ``always`` caches; ``never`` streams and writes nothing to the cache; ``auto``
(default) uses an existing entry, else estimates the entry's size from the token grids
(items x h x w x D x 2 bytes, plus the int16 labels) and caches only when it fits both
``data.cache_max_gb`` and the free space of the cache folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._progress import track
from ..errors import ConfigError, DataError
from .cache import (
    FeatureStore,
    build_entry,
    build_entry_sharded,
    default_cache_dir,
    entry_lock,
    entry_path,
    open_entry,
    open_verified,
)
from .pipeline import ItemLoader

CACHE_MODES = ("auto", "always", "never")
FREE_DISK_MARGIN = 0.9    # auto leaves a tenth of the free space to everything else


def backbone_device(backbone) -> torch.device:
    return next(iter(backbone.buffers()), torch.empty(0)).device


def token_shapes(dataset, preprocess, stride: int, dim: int) -> list[tuple[int, int, int]]:
    """D x h x w of every item's features, from the image sizes alone (none when the preprocessing
    gives one size whatever the input: short_crop and square)."""
    if preprocess.mode in ("short_crop", "square"):
        h, w = preprocess.output_size(preprocess.resolution, preprocess.resolution)
        return [(dim, h // stride, w // stride)] * len(dataset)
    shapes = []
    for i in range(len(dataset)):
        width, height = dataset.image_size(i)
        h, w = preprocess.output_size(height, width)
        shapes.append((dim, h // stride, w // stride))
    return shapes


@dataclass
class SizeEstimate:
    items: int
    features: int      # bytes
    labels: int        # bytes
    grid: tuple[int, int, int] | None   # D x h x w when every item has the same

    @property
    def total(self) -> int:
        return self.features + self.labels

    def describe(self) -> str:
        grid = f"{self.grid[1]}x{self.grid[2]} tokens x {self.grid[0]}" if self.grid else "mixed grids"
        labels = f" + labels {gb(self.labels)}" if self.labels else ""
        return f"{self.items:,} items x {grid} x 2 bytes = {gb(self.features)}{labels}"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def estimate_size(shapes: Sequence[tuple[int, int, int]], stride: int, labelled: bool) -> SizeEstimate:
    """Bytes of a cache entry: float16 features, and int16 labels at the preprocessed size."""
    feats = sum(d * h * w for d, h, w in shapes) * 2
    labels = sum(h * stride * w * stride for _, h, w in shapes) * 2 if labelled else 0
    uniform = shapes[0] if shapes and len(set(shapes)) == 1 else None
    return SizeEstimate(len(shapes), feats, labels, uniform)


def free_bytes(folder: Path) -> int:
    """Free space of the disk that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


class StreamSource:
    """Features computed by the frozen backbone for each request (nothing is written anywhere)."""

    path = None
    hit = False

    def __init__(self, backbone, dataset, preprocess, *, shapes, labelled: bool, flip: bool = False,
                 batch_size: int = 8, workers: int | None = None, strict: bool = False):
        self.backbone, self.flip, self.batch_size = backbone, flip, batch_size
        self.device = backbone_device(backbone)
        self.loader = ItemLoader(dataset, preprocess, workers=workers, strict=strict,
                                 pin_memory=self.device.type == "cuda")
        self.ids = list(dataset.ids)
        self.shapes = list(shapes)
        stride = backbone.stride
        self.label_shapes = [(h * stride, w * stride) for _, h, w in self.shapes] if labelled else None
        self._last_labels: tuple[list[int] | None, list | None] = (None, None)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.shapes[0][0]

    def _checked(self, items):
        for _, item_id, image, label, error in items:
            if error is not None:
                raise DataError(f"{error} (streamed features cannot skip an image: remove the file, "
                                "or cache the features with data.cache=always, which skips it)")
            yield item_id, image, label

    @torch.no_grad()
    def _forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(images).to(self.device, non_blocking=True)
        if self.flip:
            batch = batch.flip(-1)
        # rounded as the cache stores them, so both sources give the same numbers
        return self.backbone(batch).to(torch.float16).float().cpu()

    def _load(self, indices: Sequence[int]) -> tuple[torch.Tensor, list]:
        items = list(self._checked(self.loader.load(indices)))
        shapes = {tuple(img.shape) for _, img, _ in items}
        if len(shapes) > 1:
            raise ConfigError(f"a batch of features needs equally sized images, got {sorted(shapes)[:3]}: "
                              "set data.mode to short_crop or square")
        return self._forward([img for _, img, _ in items]), [lab for _, _, lab in items]

    def batch(self, indices) -> torch.Tensor:
        indices = [int(i) for i in indices]
        features, labels = self._load(indices)
        # the labels came with the images: kept for the labels() call that usually follows
        self._last_labels = (indices, labels)
        return features

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch([i])[0]

    def label(self, i: int) -> torch.Tensor | None:
        if self.label_shapes is None:
            return None
        return self.loader.load([int(i)])[0][3]

    def labels(self, indices) -> torch.Tensor:
        indices = [int(i) for i in indices]
        last, labels = self._last_labels
        if last != indices:
            labels = [self.label(i) for i in indices]
        return torch.stack(labels)

    def maps(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, D x h x w float32) for ``indices`` (default all) in order, batched through the backbone."""
        order = list(range(len(self)) if indices is None else indices)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush():
            feats = self._forward([img for _, img in pending])
            out = [(i, f) for (i, _), f in zip(pending, feats)]
            pending.clear()
            return out

        for index, (_, image, _) in zip(order, self._checked(self.loader.iterate(order))):
            if pending and (image.shape != pending[0][1].shape or len(pending) == self.batch_size):
                yield from flush()
            pending.append((index, image))
        if pending:
            yield from flush()


def store_maps(store: FeatureStore, indices: Iterable[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    for i in range(len(store)) if indices is None else indices:
        yield int(i), store[int(i)].float()


def iter_maps(source, indices: Iterable[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """A sequential pass over either source: (index, D x h x w float32)."""
    if isinstance(source, StreamSource):
        return source.maps(indices)
    return store_maps(source, indices)


def _forward_items(backbone, loader: ItemLoader, indices: Iterable[int], batch_size: int, flip: bool, warn):
    """(id, features D x h x w, label) for the readable items of ``indices``, consecutive same-sized
    images batched; unreadable ones are reported through ``warn`` and skipped."""
    device = backbone_device(backbone)
    pending: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []

    def flush():
        batch = torch.stack([img for _, img, _ in pending]).to(device, non_blocking=True)
        if flip:
            batch = batch.flip(-1)
        with torch.no_grad():
            feats = backbone(batch).float().cpu()
        out = [(pid, f, lab) for (pid, _, lab), f in zip(pending, feats)]
        pending.clear()
        return out

    for _, item_id, image, label, error in loader.iterate(indices):
        if error is not None:
            warn(f"skipping unreadable image: {error}")
            continue
        if pending and (image.shape != pending[0][1].shape or len(pending) == batch_size):
            yield from flush()
        pending.append((item_id, image, label))
    if pending:
        yield from flush()


def cache_fields(backbone, dataset, preprocess, flip: bool) -> dict:
    """What the cache key hashes (unchanged since format 1, so existing entries stay valid)."""
    fields = {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "preprocess": repr(preprocess),
        "flip": flip,
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "fingerprint": dataset.fingerprint(),
    }
    options = getattr(backbone, "options", None)
    if options:
        fields["options"] = options   # e.g. num_heads changes the features but not the weights id
    return fields


def has_labels(dataset) -> bool:
    """Whether the items carry labels, from the first readable one."""
    for i in range(len(dataset)):
        try:
            return dataset[i].label is not None
        except DataError:
            continue
    raise DataError(f"no readable image in {getattr(dataset, 'root', dataset)}")


class _Single:
    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj


def open_features(
    backbone,
    dataset,
    preprocess,
    *,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    max_gb: float = 100.0,
    batch_size: int = 8,
    flip: bool = False,
    strict: bool = False,
    workers: int | None = None,
    dist=None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    description: str = "extracting features",
):
    """(source, reason): the features of every item of ``dataset``, cached or streamed per ``cache``.

    ``dist`` (rank, world_size, barrier, broadcast_object; None: one process) shares the work under
    torchrun: rank 0 decides, every rank extracts its share of a new entry, once.
    """
    if cache not in CACHE_MODES:
        raise ConfigError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if not isinstance(max_gb, (int, float)) or max_gb < 0:
        raise ConfigError(f"data.cache_max_gb must be a non-negative number, got {max_gb!r}")
    dist = dist or _Single()
    warn = warn or (lambda msg: log(f"warning: {msg}"))
    shapes = token_shapes(dataset, preprocess, backbone.stride, backbone.dim)
    if not shapes:
        raise DataError(f"no image in {getattr(dataset, 'root', dataset)}")
    labelled = has_labels(dataset)
    estimate = estimate_size(shapes, backbone.stride, labelled)

    def stream(reason: str):
        source = StreamSource(backbone, dataset, preprocess, shapes=shapes, labelled=labelled, flip=flip,
                              batch_size=batch_size, workers=workers, strict=strict)
        return source, f"streaming from the backbone: {reason}"

    if cache == "never":
        return stream(choose_source(cache, estimate, max_gb, Path("."))[1])
    fields = cache_fields(backbone, dataset, preprocess, flip)
    path = entry_path(cache_dir or default_cache_dir(), fields)
    loader = ItemLoader(dataset, preprocess, workers=workers, strict=strict,
                        pin_memory=backbone_device(backbone).type == "cuda")

    def items(share: Iterable[int] = range(len(dataset))):
        share = list(share)
        yield from track(_forward_items(backbone, loader, share, batch_size, flip, warn), len(share), description)

    # rank 0 decides (its lock keeps other processes off the entry); the others follow its word
    with contextlib.ExitStack() as held:
        decision = _decide(cache, path, estimate, max_gb, log, held) if dist.rank == 0 else None
        verdict, reason = dist.broadcast_object(decision)
        if verdict == "stream":
            return stream(reason)
        if verdict == "hit":
            return open_entry(path), reason
        if dist.world_size == 1:
            store = build_entry(path, fields, items)
        else:
            store = build_entry_sharded(path, fields, items, len(dataset), dist, log)
    if len(store) == 0:
        raise DataError(f"no readable image in {getattr(dataset, 'root', dataset)}")
    return store, reason


def _decide(cache: str, path: Path, estimate: SizeEstimate, max_gb: float, log,
            held: contextlib.ExitStack) -> tuple[str, str]:
    """("hit" | "stream" | "build", reason); on "build" ``held`` holds the entry's lock."""
    if open_verified(path) is not None:
        return "hit", f"feature cache hit ({estimate.describe()}, backbone skipped) in {path}"
    verdict, reason = choose_source(cache, estimate, max_gb, path.parent)
    if verdict == "stream":
        return verdict, reason
    held.enter_context(entry_lock(path, log))
    if open_verified(path) is not None:   # built by another process while this one waited
        return "hit", f"feature cache hit ({estimate.describe()}, built by another process) in {path}"
    return "build", f"{reason} in {path}"


def choose_source(cache: str, estimate: SizeEstimate, max_gb: float, cache_dir: Path) -> tuple[str, str]:
    """("cache" | "stream", why) for a new entry of ``estimate`` bytes under ``cache_dir``."""
    if cache == "never":
        return "stream", f"data.cache=never (an entry would be {estimate.describe()})"
    free = free_bytes(cache_dir)
    if cache == "auto":
        if estimate.total > max_gb * 1e9:
            return "stream", f"an entry would be {estimate.describe()}, above data.cache_max_gb={max_gb:g}"
        if estimate.total > FREE_DISK_MARGIN * free:
            return "stream", f"an entry would be {estimate.describe()}, more than the {gb(free)} free in {cache_dir}"
    elif estimate.total > free:
        raise DataError(f"data.cache=always: the entry needs {estimate.describe()} but {cache_dir} has "
                        f"{gb(free)} free; free space, set UNSUPSEG_CACHE_DIR, or use data.cache=auto")
    return "cache", (
        f"feature cache miss: extracting and caching ({estimate.describe()}; budget data.cache_max_gb={max_gb:g}, "
        f"{gb(free)} free)"
    )
