"""Cached and streamed features: size estimates, the choice between them, same numbers either way,
the same results for any number of decode workers, and the lock that lets two processes share an entry."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unsupseg.backbones import build_backbone
from unsupseg.data import ImageFolder, Preprocess
from unsupseg.errors import ConfigError
from unsupseg.features import source as source_mod
from unsupseg.features.cache import build_entry, entry_lock, entry_path, open_or_build
from unsupseg.features.clustering import gather_tokens
from unsupseg.features.knn import knn_table
from unsupseg.features.pipeline import ItemLoader
from unsupseg.features.source import (
    StreamSource,
    choose_source,
    estimate_size,
    open_features,
    token_shapes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("dino_vits16", "random")


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i in range(6):
        pixels = (gen.random((50 + 3 * i, 70, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_size_estimate_by_hand():
    # COCO-Stuff-27, five crops of 49,629 images, dino_vitb8 at 320 px: 40 x 40 tokens x 768 channels
    shapes = [(768, 40, 40)] * (49_629 * 5)
    est = estimate_size(shapes, stride=8, labelled=True)
    assert est.items == 248_145
    assert est.features == 248_145 * 40 * 40 * 768 * 2 == 609_841_152_000
    assert est.labels == 248_145 * 320 * 320 * 2 == 50_820_096_000
    assert est.grid == (768, 40, 40)
    assert "609.8 GB" in est.describe()
    unlabelled = estimate_size([(4, 2, 3), (4, 3, 3)], stride=16, labelled=False)
    assert unlabelled.features == (24 + 36) * 2 and unlabelled.labels == 0 and unlabelled.grid is None


def test_token_shapes_from_image_sizes(photos):
    data = ImageFolder(photos)
    # short side 32, long side round-half-up of 70 * 32 / h, then cut to multiples of 16
    shapes = token_shapes(data, Preprocess(32, "short", "bilinear", 16), 16, 384)
    expected = [(384, 2, (2 * 70 * 32 + h) // (2 * h) // 16) for h in (50, 53, 56, 59, 62, 65)]
    assert shapes == expected == [(384, 2, 2), (384, 2, 2), (384, 2, 2), (384, 2, 2), (384, 2, 2), (384, 2, 2)]
    assert token_shapes(data, Preprocess(64, "short_crop", "bilinear", 16), 16, 384) == [(384, 4, 4)] * 6


def test_choice_follows_budget_and_free_disk(tmp_path, monkeypatch):
    est = estimate_size([(768, 40, 40)] * 1000, 8, False)      # 2.4576 GB
    assert choose_source("auto", est, 100.0, tmp_path)[0] == "cache"
    verdict, reason = choose_source("auto", est, 2.0, tmp_path)
    assert verdict == "stream" and "above data.cache_max_gb=2" in reason and "2.5 GB" in reason
    monkeypatch.setattr(source_mod, "free_bytes", lambda folder: 2_000_000_000)
    verdict, reason = choose_source("auto", est, 100.0, tmp_path)
    assert verdict == "stream" and "2.0 GB free" in reason
    with pytest.raises(Exception, match="data.cache=always"):
        choose_source("always", est, 100.0, tmp_path)
    assert choose_source("never", est, 100.0, tmp_path)[0] == "stream"


def test_bad_cache_mode_is_refused(vit, photos):
    with pytest.raises(ConfigError, match="data.cache must be one of"):
        open_features(vit, ImageFolder(photos), Preprocess(64, "short_crop", "bilinear", 16), cache="sometimes")


def test_streamed_batches_equal_cached_batches(vit, photos, tmp_path):
    data, prep = ImageFolder(photos), Preprocess(64, "short_crop", "bilinear", 16)
    cached, _ = open_features(vit, data, prep, cache="always", cache_dir=tmp_path / "c", batch_size=4, workers=0)
    streamed, reason = open_features(vit, data, prep, cache="never", cache_dir=tmp_path / "n", batch_size=4, workers=0)
    assert isinstance(streamed, StreamSource) and "data.cache=never" in reason
    assert not (tmp_path / "n").exists()                       # never: not a byte in the cache
    assert streamed.ids == cached.ids and streamed.shapes == cached.shapes and streamed.dim == cached.dim == 384
    for index in ([3, 1, 4], [0], [5, 2, 0, 1]):
        assert torch.equal(streamed.batch(index), cached.batch(index))
    # the generic passes the methods use read the same tokens from either source
    gen = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    assert torch.equal(gather_tokens(streamed, 40, gen()), gather_tokens(cached, 40, gen()))
    table, hit = knn_table(streamed, 3)
    assert not hit and torch.equal(table, knn_table(cached, 3)[0])


def test_auto_streams_above_the_budget_and_writes_nothing(vit, photos, tmp_path):
    data, prep = ImageFolder(photos), Preprocess(64, "short_crop", "bilinear", 16)
    # 6 items x 4 x 4 tokens x 384 x 2 bytes = 73,728 bytes: over a 50 kB budget
    src, reason = open_features(vit, data, prep, cache="auto", cache_dir=tmp_path / "c", max_gb=5e-5, workers=0)
    assert isinstance(src, StreamSource)
    assert "6 items x 4x4 tokens x 384 x 2 bytes = 0.1 MB" in reason and "above data.cache_max_gb" in reason
    assert not (tmp_path / "c").exists()
    src, reason = open_features(vit, data, prep, cache="auto", cache_dir=tmp_path / "c", max_gb=1e-4, workers=0)
    assert not isinstance(src, StreamSource) and "extracting and caching" in reason


def test_zero_and_two_workers_give_identical_items_and_features(vit, photos, tmp_path):
    data, prep = ImageFolder(photos), Preprocess(48, "short", "bilinear", 16)
    order = [4, 0, 5, 1, 3, 2]
    serial, parallel = ItemLoader(data, prep, workers=0), ItemLoader(data, prep, workers=2)
    for a, b in zip(serial.load(order), parallel.load(order), strict=True):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    s0, _ = open_features(vit, data, prep, cache="always", cache_dir=tmp_path / "w0", workers=0)
    s2, _ = open_features(vit, data, prep, cache="always", cache_dir=tmp_path / "w2", workers=2)
    assert s0.ids == s2.ids == [str(i) for i in range(6)]
    for i in range(6):
        assert torch.equal(s0[i], s2[i])


def _waiter_on(lock: Path) -> bool:
    """True when /proc/locks shows a process blocked on ``lock`` (its lines start with '->')."""
    inode = f":{lock.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def _hold_then_build(folder: str, holding) -> None:
    path = entry_path(folder, {"k": 1})
    with entry_lock(path):
        holding.set()
        lock = path.with_name(path.name + ".lock")
        for _ in range(6000):          # until the other process waits on the lock (at most a minute)
            if _waiter_on(lock):
                break
            time.sleep(0.01)
        build_entry(path, {"k": 1}, lambda: iter([("a", torch.ones(2, 1, 1), None)]))


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_second_process_waits_for_the_builder_and_reads_its_entry(tmp_path):
    ctx = mp.get_context("fork")
    holding = ctx.Event()
    builder = ctx.Process(target=_hold_then_build, args=(str(tmp_path), holding))
    builder.start()
    try:
        assert holding.wait(60)
        logs = []

        def never_called():
            raise AssertionError("the waiting process must read the entry, not build it again")

        store = open_or_build(tmp_path, {"k": 1}, never_called, log=logs.append)
    finally:
        builder.join(60)
    assert builder.exitcode == 0
    assert store.ids == ["a"] and torch.equal(store[0].float(), torch.ones(2, 1, 1))
    assert any("waiting for it" in line for line in logs)
