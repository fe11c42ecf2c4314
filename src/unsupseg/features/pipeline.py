"""The input pipeline: decode, crop and resize in ``torch.utils.data`` worker processes.

Every item is ``(index, id, image 3 x H x W in [0, 1], label H x W or None, error or None)``. Items
come back in the order asked for whatever the number of workers (the DataLoader keeps order, and no
step draws randomness), so results do not depend on ``workers``. Worker processes persist between
requests, so training can ask for one batch of arbitrary indices per step; they prefetch
``prefetch`` items each and pin memory when the backbone runs on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, DataError

Item = tuple[int, str, torch.Tensor | None, torch.Tensor | None, str | None]


def default_workers() -> int:
    """Decode processes per training process: the CPUs this process may use, shared with the other
    processes torchrun started on this machine, one left for the main process; at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local - 1))


def resolve_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.workers must be a non-negative integer or null, got {workers!r}")
    return workers


class PreprocessedItems(Dataset):
    """``dataset[i]`` through ``preprocess``; a decode failure becomes an item carrying the message, so
    the caller decides to skip it or stop (raised in a worker, it would reach the user wrapped in the
    worker's traceback)."""

    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item:
        try:
            sample = self.dataset[i]
        except DataError as err:
            return i, self.dataset.ids[i], None, None, str(err)
        image, label = self.preprocess.apply(sample.image, sample.label)
        return i, sample.id, image, label, None


class _Feed(Sampler):
    """The indices of the current request; a persistent DataLoader re-reads it on every ``iter``."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_is(item):
    return item


class ItemLoader:
    """Preprocessed items of ``dataset`` for any sequence of indices, decoded by ``workers`` processes
    (0: in this process); ``strict``: the first item that cannot be read raises its DataError."""

    def __init__(self, dataset, preprocess, *, workers: int | None = None, strict: bool = False,
                 pin_memory: bool = False, prefetch: int = 4):
        self.workers = resolve_workers(workers)
        self.items = PreprocessedItems(dataset, preprocess)
        self.strict = strict
        self._feed = _Feed()
        extra = {"prefetch_factor": prefetch, "persistent_workers": True} if self.workers else {}
        # its own generator: each new iterator draws a worker base seed, which from the global RNG would
        # shift the training's dropout masks whenever features are read through the pipeline
        self._loader = DataLoader(self.items, batch_size=None, sampler=self._feed, num_workers=self.workers,
                                  collate_fn=_as_is, pin_memory=pin_memory, generator=torch.Generator(), **extra)

    def __len__(self) -> int:
        return len(self.items)

    def iterate(self, indices: Iterable[int]) -> Iterator[Item]:
        """Items of ``indices`` in that order (lazily: at most workers x prefetch items ahead)."""
        self._feed.indices = [int(i) for i in indices]
        for item in self._loader:
            if self.strict and item[4] is not None:
                raise DataError(item[4])
            yield tuple(item)

    def load(self, indices: Sequence[int]) -> list[Item]:
        return list(self.iterate(indices))
