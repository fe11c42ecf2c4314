"""Paper scale from the outside: streamed and cached fits agree, decode workers change nothing, two
processes share a cold cache, and ``fit --plan`` says what a fit would do without doing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_images
from unsupseg import api

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_thread")


def _kmeans(images, out, *sets):
    api.fit("kmeans", out=out, images=images, clusters=3, backbone_weights="random",
            overrides=["params.restarts=1", "params.iterations=5", *sets], log=lambda msg: None)
    return load_file(out / "weights.safetensors")["centroids"]


def test_streamed_fit_equals_cached_fit_and_writes_no_cache(tmp_path, monkeypatch):
    images = tmp_path / "photos"
    write_images(images, 6)
    monkeypatch.setenv("UNSUPSEG_CACHE_DIR", str(tmp_path / "never-cache"))
    streamed = _kmeans(images, tmp_path / "never", "data.cache=never", "data.workers=0")
    assert not (tmp_path / "never-cache").exists()        # not a byte, not a folder
    monkeypatch.setenv("UNSUPSEG_CACHE_DIR", str(tmp_path / "cache"))
    cached = _kmeans(images, tmp_path / "always", "data.cache=always", "data.workers=0")
    assert any((tmp_path / "cache").iterdir())
    assert torch.equal(streamed, cached)


def test_streamed_cause_fit_equals_cached_fit(tmp_path, monkeypatch):
    # CAUSE draws dropout masks from the global RNG: reading features must not move it
    images = tmp_path / "photos"
    write_images(images, 8)
    overrides = ["data.resolution=64", "data.workers=0", "params.concepts=8", "params.projection_dim=8",
                 "params.bank_size=4", "params.batch_size=4", "params.mediator_epochs=1", "params.head_epochs=2",
                 "params.cluster_epochs=1", "params.linear_probe=false"]
    states = []
    for cache in ("never", "always"):
        api.fit("cause-mlp", preset="demo", out=tmp_path / cache, images=images, clusters=3, backbone_weights="random",
                overrides=[*overrides, f"data.cache={cache}"], log=lambda msg: None)
        states.append(load_file(tmp_path / cache / "weights.safetensors"))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_zero_and_two_decode_workers_give_identical_weights(tmp_path):
    images = tmp_path / "photos"
    write_images(images, 6)
    w0 = _kmeans(images, tmp_path / "w0", "data.cache=never", "data.workers=0")
    w2 = _kmeans(images, tmp_path / "w2", "data.cache=never", "data.workers=2")
    assert torch.equal(w0, w2)


def _cli(*args, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "UNSUPSEG_CACHE_DIR": str(cache), "UNSUPSEG_PROGRESS": "0",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "unsupseg.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_fits_on_one_cold_cache_both_finish(tmp_path):
    # issue 17.3: two `fit` on the same images with a cold cache crashed in the cache writer
    images = tmp_path / "photos"
    write_images(images, 24, size=(96, 72))
    args = ["fit", "--method", "kmeans", "--images", str(images), "--clusters", "3", "--backbone-weights", "random",
            "--set", "params.restarts=1", "--set", "params.iterations=5"]
    runs = [_cli(*args, "--out", str(tmp_path / f"run{i}"), cache=tmp_path / "cache") for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    a, b = (load_file(tmp_path / f"run{i}" / "weights.safetensors")["centroids"] for i in range(2))
    assert torch.equal(a, b)
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not list(entries[0].glob(".*.tmp"))


def test_plan_of_a_paper_preset_prints_the_numbers_and_writes_nothing(tmp_path):
    images = tmp_path / "photos"
    write_images(images, 26, size=(64, 48))
    proc = _cli("fit", "--method", "cause-tr", "--preset", "cocostuff27", "--images", str(images),
                "--backbone-weights", "random", "--out", str(tmp_path / "run"), "--plan",
                "--set", "data.cache_max_gb=0.3", "--set", "data.workers=3", "--throughput", "0.25",
                cache=tmp_path / "cache")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text
    lines = text.splitlines()
    # five crops (the preset's data.crop) of 26 images; dino_vitb8 at 320 px: 40 x 40 tokens x 768
    assert "130 training items (26 images x 5 five crops)" in lines[0]
    assert "backbone dino_vitb8: 768 channels, stride 8" in lines[1] and "3 decode workers" in lines[1]
    # 130 x 40 x 40 x 768 x 2 bytes = 319,488,000 bytes, over the 0.3 GB budget: streamed
    assert "features at 320px: 130 items x 40x40 tokens x 768 x 2 bytes = 319.5 MB" in lines
    assert any(line.startswith("  source: stream") and "above data.cache_max_gb=0.3" in line for line in lines)
    # epochs of 130 // (16 x 4) = 2 steps; 1, 2 and 5 epochs
    assert any("cause-step1-clusterbook: 2 steps per epoch, 2 steps in total, 16 items" in line for line in lines)
    assert any("cause-step2-front-door: 2 steps per epoch, 4 steps in total" in line for line in lines)
    assert any("cause-step3-cluster: 2 steps per epoch, 10 steps in total" in line for line in lines)
    # 2048 concepts x 100 entries x 2048 x 4 bytes = 1,677,721,600 bytes
    assert any("concept bank" in line and "1.7 GB" in line for line in lines)
    # (2 + 4 + 10) steps x 16 items = 256 reads at 0.25 items/s = 1,024 s
    assert "time: 256 item reads at 0.25 items/s: about 0.3 h" in lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_plan_within_the_cache_budget_says_a_cached_entry_would_be_a_hit(tmp_path):
    """The plan reads no weights, so it cannot know the entry's key: it must not claim a miss outright."""
    write_images(tmp_path / "photos", 4, size=(64, 48))
    config = api.resolve_config("kmeans", **{"data.images": str(tmp_path / "photos"), "backbone.weights": "random"})
    lines = api.plan(config, cache_dir=tmp_path / "cache")
    source = [line for line in lines if line.startswith("  source:")]
    assert len(source) == 1 and source[0].startswith("  source: cache: feature cache miss")
    assert source[0].endswith("(a hit instead, backbone skipped, if this entry is already cached)")
    assert not (tmp_path / "cache").exists()
