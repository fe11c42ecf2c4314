"""On-disk feature cache: backbone outputs stored once, memory-mapped for every later epoch.

Layout of one entry ``<cache_dir>/<key>/``:
  ``features.f16``  all feature maps back to back, float16, C-order D x h x w each
  ``labels.i16``    label maps at the preprocessed size (int16, -1 = ignore), when the data has labels
  ``index.json``    ids, shapes and offsets, plus the fields the key was computed from
The key hashes everything that changes the numbers (backbone name, weights checksum, preprocessing,
flip, dataset fingerprint), so a change re-extracts. ``index.json`` is written last and records the
byte sizes; an entry whose files do not match it (truncated, interrupted) is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path, atomic_write_text

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$UNSUPSEG_CACHE_DIR`` or ``~/.cache/unsupseg/features``."""
    env = os.environ.get("UNSUPSEG_CACHE_DIR")
    # a quoted '~/x' reaches us unexpanded; without expanduser it made a folder named '~' here
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unsupseg" / "features"


def cache_key(fields: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


@dataclass
class FeatureStore:
    """Read-only view of one cache entry. ``store[i]`` is a D x h x w float16 tensor (memory-mapped)."""

    path: Path
    ids: list[str]
    shapes: list[tuple[int, int, int]]
    label_shapes: list[tuple[int, int]] | None
    hit: bool
    _feat: np.ndarray
    _feat_offsets: np.ndarray
    _labels: np.ndarray | None
    _label_offsets: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.shapes[0][0]

    def __getitem__(self, i: int) -> torch.Tensor:
        start, shape = int(self._feat_offsets[i]), self.shapes[i]
        count = shape[0] * shape[1] * shape[2]
        return torch.from_numpy(np.asarray(self._feat[start : start + count]).reshape(shape))

    def label(self, i: int) -> torch.Tensor | None:
        if self._labels is None:
            return None
        start, shape = int(self._label_offsets[i]), self.label_shapes[i]
        return torch.from_numpy(
            np.asarray(self._labels[start : start + shape[0] * shape[1]]).reshape(shape).astype(np.int64)
        )

    def batch(self, indices) -> torch.Tensor:
        """Stack same-shaped maps into B x D x h x w float32."""
        # each map to float32 first: training steps run under autocast, which refuses to stack float16
        # tensors in a bf16 region
        return torch.stack([self[int(i)].float() for i in indices])

    def labels(self, indices) -> torch.Tensor:
        return torch.stack([self.label(int(i)) for i in indices])

    def finite(self) -> bool:
        """True when no feature is NaN or infinite; read in 32 MB slices (the pages stay cached for training)."""
        step = 1 << 24
        return all(np.isfinite(self._feat[i : i + step]).all() for i in range(0, len(self._feat), step))


def _open(path: Path, hit: bool) -> FeatureStore | None:
    index_file = path / "index.json"
    if not index_file.exists():
        return None
    try:
        index = json.loads(index_file.read_text())
        shapes = [tuple(s) for s in index["shapes"]]
        n_feat = sum(a * b * c for a, b, c in shapes)
        feat_file = path / "features.f16"
        if feat_file.stat().st_size != 2 * n_feat or index.get("format") != FORMAT_VERSION:
            return None
        feat = np.memmap(feat_file, dtype=np.float16, mode="c", shape=(n_feat,))
        offsets = np.concatenate([[0], np.cumsum([a * b * c for a, b, c in shapes])[:-1]]).astype(np.int64)
        labels = label_offsets = label_shapes = None
        if index.get("label_shapes") is not None:
            label_shapes = [tuple(s) for s in index["label_shapes"]]
            n_lab = sum(a * b for a, b in label_shapes)
            label_file = path / "labels.i16"
            if label_file.stat().st_size != 2 * n_lab:
                return None
            labels = np.memmap(label_file, dtype=np.int16, mode="c", shape=(n_lab,))
            label_offsets = np.concatenate([[0], np.cumsum([a * b for a, b in label_shapes])[:-1]]).astype(np.int64)
    except (OSError, ValueError, KeyError):
        return None
    return FeatureStore(path, index["ids"], shapes, label_shapes, hit, feat, offsets, labels, label_offsets)


def entry_path(cache_dir: str | os.PathLike, key_fields: dict) -> Path:
    return Path(cache_dir) / cache_key(key_fields)


def open_entry(path: Path) -> FeatureStore | None:
    """The complete entry at ``path`` (a cache hit), or None."""
    return _open(path, hit=True)


def open_verified(path: Path) -> FeatureStore | None:
    """``open_entry``, and None with a warning for an entry holding NaN or infinite values (damaged on
    disk): its index goes, so the caller rebuilds it like a truncated one."""
    store = open_entry(path)
    if store is not None and not store.finite():
        warnings.warn(f"feature cache {path} holds NaN or infinite values (damaged); rebuilding it", stacklevel=2)
        (path / "index.json").unlink(missing_ok=True)
        return None
    return store


@contextlib.contextmanager
def entry_lock(path: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``<entry>.lock`` exclusively while building ``path``. Another process that wants the same
    entry waits here, then finds it complete. flock is released by the kernel when its holder exits,
    however it exits, so a killed builder never leaves a stale lock behind (the waiter then finds an
    incomplete entry and rebuilds it)."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"another process is building the feature cache entry {path}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_items(items: Iterable, feat_file: Path, label_file: Path) -> tuple[list, list, list, bool | None]:
    ids, shapes, label_shapes = [], [], []
    has_labels = None
    with open(feat_file, "wb") as feat_fh, open(label_file, "wb") as lab_fh:
        for item_id, feats, label in items:
            ids.append(item_id)
            shapes.append(tuple(int(s) for s in feats.shape))
            feat_fh.write(feats.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
            if has_labels is None:
                has_labels = label is not None
            if has_labels:
                label_shapes.append(tuple(int(s) for s in label.shape))
                lab_fh.write(label.to(torch.int16).contiguous().numpy().tobytes())
    return ids, shapes, label_shapes, has_labels


def _fresh_dir(path: Path) -> None:
    if path.exists():
        if (path / "index.json").exists():
            warnings.warn(f"feature cache {path} is incomplete or truncated; rebuilding it", stacklevel=3)
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _finish(path: Path, key_fields: dict, ids, shapes, label_shapes, has_labels) -> FeatureStore:
    if not has_labels:
        (path / "labels.i16").unlink(missing_ok=True)
    index = {
        "format": FORMAT_VERSION,
        "key": key_fields,
        "ids": ids,
        "shapes": shapes,
        "label_shapes": label_shapes if has_labels else None,
    }
    atomic_write_text(path / "index.json", json.dumps(index))
    store = _open(path, hit=False)
    assert store is not None, f"feature cache {path} unreadable right after writing"
    return store


def build_entry(path: Path, key_fields: dict, items: Callable[[], Iterable]) -> FeatureStore:
    """Write the entry at ``path`` from ``items()`` (the caller holds its lock)."""
    _fresh_dir(path)
    with atomic_path(path / "features.f16") as feat_tmp, atomic_path(path / "labels.i16") as lab_tmp:
        ids, shapes, label_shapes, has_labels = _write_items(items(), feat_tmp, lab_tmp)
    return _finish(path, key_fields, ids, shapes, label_shapes, has_labels)


def build_entry_sharded(path: Path, key_fields: dict, items: Callable[[range], Iterable], total: int, dist,
                        log: Callable[[str], None]) -> FeatureStore:
    """Every process of ``dist`` (rank, world_size, barrier) writes the items of its contiguous share of
    ``range(total)`` to its own part files; rank 0 (holding the entry's lock) then joins the parts in
    rank order, so the entry equals a single-process build. No two processes write the same file."""
    rank, world = dist.rank, dist.world_size
    if rank == 0:
        _fresh_dir(path)
    dist.barrier()
    share = range(total * rank // world, total * (rank + 1) // world)
    part = path / f".part{rank}"
    with atomic_path(part.with_suffix(".f16")) as feat_tmp, atomic_path(part.with_suffix(".i16")) as lab_tmp:
        ids, shapes, label_shapes, has_labels = _write_items(items(share), feat_tmp, lab_tmp)
    atomic_write_text(part.with_suffix(".json"), json.dumps(
        {"ids": ids, "shapes": shapes, "label_shapes": label_shapes, "has_labels": has_labels}))
    log(f"feature cache: rank {rank}/{world} extracted its share, items {share.start}-{share.stop - 1} "
        f"({len(ids)} of {total}), into {part.name}.f16")
    dist.barrier()
    if rank == 0:
        parts = [path / f".part{r}" for r in range(world)]
        metas = [json.loads(p.with_suffix(".json").read_text()) for p in parts]
        has_labels = next((m["has_labels"] for m in metas if m["has_labels"] is not None), None)
        for suffix, name in ((".f16", "features.f16"), (".i16", "labels.i16")):
            with atomic_path(path / name) as tmp, open(tmp, "wb") as out:
                for p in parts:
                    with open(p.with_suffix(suffix), "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 24)
        for p in parts:
            for suffix in (".f16", ".i16", ".json"):
                p.with_suffix(suffix).unlink()
        _finish(path, key_fields, [i for m in metas for i in m["ids"]],
                [tuple(s) for m in metas for s in m["shapes"]],
                [tuple(s) for m in metas for s in m["label_shapes"]], has_labels)
    dist.barrier()
    store = _open(path, hit=False)
    assert store is not None, f"feature cache {path} unreadable right after writing"
    return store


def open_or_build(
    cache_dir: str | os.PathLike,
    key_fields: dict,
    items: Callable[[], Iterable[tuple[str, torch.Tensor, torch.Tensor | None]]],
    log: Callable[[str], None] | None = None,
) -> FeatureStore:
    """Return the cached entry for ``key_fields``, building it from ``items()`` when missing or broken.

    ``items()`` yields ``(id, features D x h x w, label h' x w' or None)`` and is only called on a miss.
    Safe when several processes ask for the same entry at once: one builds it, the others wait and read.
    """
    path = entry_path(cache_dir, key_fields)
    store = open_verified(path)
    if store is not None:
        return store
    with entry_lock(path, log):
        store = open_verified(path)   # built by another process while this one waited
        if store is not None:
            return store
        return build_entry(path, key_fields, items)
