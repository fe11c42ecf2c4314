"""STEGO training: end to end through the API, exact resume, presets."""

import numpy as np
import pytest
import torch

import unsupseg.api as api
from tests.conftest import write_images
from unsupseg.config import RunConfig, from_dict, preset_names, to_dict
from unsupseg.engine import Dist, run_stage
from unsupseg.errors import ConfigError, Interrupted
from unsupseg.features.cache import open_or_build
from unsupseg.features.knn import knn_indices, pooled_descriptors
from unsupseg.methods import stego
from unsupseg.methods.base import FitContext

TINY = ["params.steps=4", "params.batch_size=4", "params.knn_k=2", "params.dim=6", "params.neg_samples=2",
        "params.feature_samples=3", "data.resolution=32", "test.crf=false", "params.checkpoint_every=2"]


def test_fit_end_to_end_with_a_random_backbone(tmp_path):
    write_images(tmp_path / "imgs", 6)
    seg = api.fit("stego", out=tmp_path / "run", images=tmp_path / "imgs", backbone="efficientnet_lite0",
                  backbone_weights="random", clusters=3, overrides=TINY, log=lambda _: None)
    run = api.rundir.load(tmp_path / "run")
    assert run.config.method == "stego" and run.config.test.alpha == 2.0
    knn = run.state["knn"]
    assert knn.dtype == torch.int64 and knn.shape == (6, 6)          # top-30 capped at the 6 images
    assert torch.equal(knn[:, 0], torch.arange(6))
    assert run.state["cluster_probe"].shape == (3, 6)
    assert "linear_probe.weight" not in run.state                       # an image folder has no labels
    labels = seg.predict(tmp_path / "imgs" / "img_00.png")
    assert labels.shape == (48, 64) and labels.min() >= 0 and labels.max() < 3
    # a reloaded run predicts the same
    assert np.array_equal(api.load(tmp_path / "run").predict(tmp_path / "imgs" / "img_00.png"), labels)


def test_unequal_feature_maps_need_crops(tmp_path):
    write_images(tmp_path / "imgs" / "a", 3, size=(64, 48))
    write_images(tmp_path / "imgs" / "b", 3, size=(48, 64), seed=1)
    common = dict(out=tmp_path / "run", images=tmp_path / "imgs", backbone="efficientnet_lite0",
                  backbone_weights="random", clusters=2, log=lambda _: None)
    with pytest.raises(ConfigError, match="params.crop"):
        api.fit("stego", overrides=TINY + ["data.mode=short"], **common)
    api.fit("stego", overrides=TINY + ["data.mode=short", "params.crop=3"], overwrite=True, **common)


def _store(folder, n=8, dim=12, side=5, labelled=True):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(dim, side, side, generator=gen) for _ in range(n)]
    labels = [torch.randint(-1, 3, (side * 8, side * 8), generator=gen) for _ in range(n)]

    def items():
        for i in range(n):
            yield f"im{i}", maps[i], labels[i] if labelled else None

    return open_or_build(folder, {"test": "stego", "n": n, "labelled": labelled}, items)


class _Stride8:
    stride = 8


def _training(store, dist=None, **overrides):
    params = stego.Params(**{"dim": 4, "batch_size": 4, "steps": 6, "knn_k": 2, "feature_samples": 3,
                             "neg_samples": 2, "checkpoint_every": 2, **overrides})
    config = RunConfig(method="stego", clusters=3, params=to_dict(params))
    ctx = FitContext(config, params, _Stride8(), lambda **_: store, None, 3, dist or Dist(), None, lambda _: None)
    table = knn_indices(pooled_descriptors(store), min(30, len(store)))
    torch.manual_seed(0)      # dropout draws from the global RNG, seeded by api.fit in a real run
    return stego.build_training(ctx, store, table)


def test_resumed_training_equals_uninterrupted(tmp_path):
    store = _store(tmp_path / "cache")
    stage, straight = _training(store, crop=3)
    run_stage(stage, None, Dist())

    stage, _ = _training(store, crop=3)
    inner = stage.step

    def failing(i, batch):
        if i == 5:
            raise KeyboardInterrupt
        return inner(i, batch)

    stage.step = failing
    with pytest.raises(Interrupted, match=r"resume from step 4/6 of stego$"):
        run_stage(stage, tmp_path / "ckpt", Dist())
    stage, resumed = _training(store, crop=3)
    assert len(run_stage(stage, tmp_path / "ckpt", Dist())) == 2          # steps 4 and 5 only
    assert resumed.linear_probe is not None                              # labelled data: all three optimisers
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_presets_resolve_and_keep_the_published_values():
    assert {"default", "camvid", "cocostuff27", "cityscapes27", "potsdam3"} <= set(preset_names("stego"))
    coco = api.resolve_config("stego", **{"data.dataset": "cocostuff27"})
    p = from_dict(stego.Params, coco.params)
    assert (coco.backbone.name, p.dim, p.steps, p.batch_size, p.pointwise) == ("dino_vitb8", 90, 7000, 32, True)
    assert (p.weight_self, p.weight_knn, p.shift_self, p.shift_knn, p.shift_rand) == (0.1, 1.0, 0.12, 0.2, 1.0)
    city = from_dict(stego.Params, api.resolve_config("stego", **{"data.dataset": "cityscapes27"}).params)
    assert (city.dim, city.pointwise, city.weight_knn) == (100, False, 0.577453483136995)
    potsdam = api.resolve_config("stego", **{"data.dataset": "potsdam3"})
    assert (potsdam.clusters, potsdam.backbone.name, potsdam.params["shift_rand"]) == (3, "dino_vits8", 0.76)
    for config in (coco, potsdam):
        assert config.test.crf and config.test.flip and config.test.alpha == 2.0
    camvid = api.resolve_config("stego", **{"data.dataset": "camvid"})
    assert camvid.backbone.name == "efficientnet_lite0" and not camvid.test.crf and camvid.test.alpha == 2.0
