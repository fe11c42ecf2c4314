"""Mixed precision: the auto | bf16 | fp32 switch, decided in the engine for training and inference.

No GPU here: the CUDA decision is tested through the decision function, and the bf16 code paths
through CPU autocast (a real PyTorch mode, slower than float32 on CPU, used only by these tests).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import unsupseg.api as api
from unsupseg.config import RunConfig
from unsupseg.engine import Dist, Stage, autocast, init_distributed, resolve_precision, run_stage
from unsupseg.engine.precision import autocast_dtype
from unsupseg.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "setting, device, cuda_bf16, expected",
    [
        ("auto", "cpu", None, "fp32"),      # CPU computes in float32 as before
        ("auto", "cuda", True, "bf16"),     # a GPU with bf16 units gets autocast by default
        ("auto", "cuda:1", True, "bf16"),
        ("auto", "cuda", False, "fp32"),    # emulated bf16 (pre-Ampere) is slower than float32
        ("fp32", "cuda", True, "fp32"),     # the switch that turns it off
        ("bf16", "cpu", None, "bf16"),      # forced, e.g. to check a code path on CPU
        ("bf16", "cuda", False, "bf16"),
    ],
)
def test_precision_resolves_per_device(setting, device, cuda_bf16, expected):
    assert resolve_precision(setting, torch.device(device), cuda_bf16=cuda_bf16) == expected


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision.*'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision"):
        init_distributed("cpu", "half")


def test_cuda_bf16_autocasts_on_the_cuda_device_type():
    # the context's arguments only (entering a CUDA autocast needs a GPU)
    assert autocast_dtype(resolve_precision("auto", "cuda", cuda_bf16=True)) is torch.bfloat16
    assert autocast_dtype("fp32") is None
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def test_default_dist_and_cpu_auto_stay_float32():
    assert Dist().precision == "fp32"
    assert init_distributed("cpu").precision == "fp32"
    assert init_distributed("cpu", "auto").precision == "fp32"
    assert init_distributed("cpu", "bf16").precision == "bf16"


def _linear_stage(seen):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def step(_, idx):
        out = model(data[idx])
        seen.append(out.dtype)
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        seen.append(model.weight.grad.dtype)
        opt.step()
        return {"loss": float(loss.detach()), "images": len(idx)}

    return Stage("p", 4, 2, lambda e: [torch.arange(4), torch.arange(4, 8)], step, {"model": model}), model


def test_run_stage_runs_steps_in_the_dists_precision_with_float32_weights():
    seen = []
    stage, model = _linear_stage(seen)
    run_stage(stage, None, Dist(precision="bf16"))
    # forward in bf16; gradients, weights (the master copy) in float32
    assert seen[0::2] == [torch.bfloat16] * 4 and seen[1::2] == [torch.float32] * 4
    assert model.weight.dtype is torch.float32
    bf16_weights = model.weight.detach().clone()

    seen.clear()
    stage, model = _linear_stage(seen)
    run_stage(stage, None, Dist())
    assert seen[0::2] == [torch.float32] * 4
    assert not torch.equal(model.weight, bf16_weights)   # the precision did change the computation


@pytest.mark.parametrize("method", ["cause-mlp", "cause-tr", "stego"])
def test_every_trainer_fits_and_predicts_under_bf16_autocast(tmp_path, method):
    """The shared autocast wraps whole training steps (data loading included): each trainer must run
    under it, end with float32 weights, and log the precision."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    if method == "stego":
        overrides = ["params.steps=3", "params.batch_size=3", "params.knn_k=2", "params.dim=6", "params.neg_samples=2",
                     "params.feature_samples=3", "data.resolution=32"]
    else:
        overrides = [
            "params.concepts=8",
            "params.reduced_dim=6",
            "params.projection_dim=8",
            "params.bank_size=4",
            "params.batch_size=3",
            "params.ref_world_size=1",
            "params.tr_ffn_dim=16",
            "params.cluster_epochs=1",
            "params.train_resolution=null",
            "params.mediator_resolution=null",
            "data.resolution=64",
        ]
    overrides += ["data.mode=short_crop", "test.crf=false", "precision=bf16",
                  f"cache_dir={tmp_path / 'cache'}"]
    messages = []
    seg = api.fit(method, out=tmp_path / "run", images=folder, backbone="dino_vits16", backbone_weights="random",
                  clusters=3, overrides=overrides, log=messages.append)
    assert any("bf16 autocast" in m for m in messages)
    run = api.rundir.load(tmp_path / "run")
    assert all(v.dtype in (torch.float32, torch.int64) for v in run.state.values())
    assert seg.precision == "bf16"
    labels = seg.predict(folder / "0.png")
    assert labels.shape == (64, 80) and labels.max() < 3


def test_segmenter_precision_follows_the_run_and_can_be_overridden(tmp_path):
    class Backbone(torch.nn.Module):
        stride, dim, name, weights_id = 8, 4, "toy", "toy"
        autocast_seen: list = []

        def forward(self, x):
            self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
            return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]

    from unsupseg.methods.base import PredictorInfo
    from unsupseg.methods.kmeans import build_predictor

    predictor = build_predictor(None, {"centroids": torch.randn(3, 4)}, PredictorInfo(3, 4, 8))
    assert api.Segmenter(RunConfig(), Backbone(), predictor, torch.device("cpu")).precision == "fp32"
    assert api.Segmenter(RunConfig(precision="bf16"), Backbone(), predictor, torch.device("cpu")).precision == "bf16"
    seg = api.Segmenter(RunConfig(precision="bf16"), Backbone(), predictor, torch.device("cpu"), precision="fp32")
    assert seg.precision == "fp32"
    bf16 = api.Segmenter(RunConfig(precision="bf16"), Backbone(), predictor, torch.device("cpu"))
    feats = torch.rand(1, 4, 3, 5)
    # scores come back in float32 whatever the precision
    assert bf16.scores(feats, None, (24, 40)).dtype is torch.float32
    assert seg.scores(feats, None, (24, 40)).dtype is torch.float32
    # the backbone forward of a prediction runs in the Segmenter's precision too
    Backbone.autocast_seen.clear()
    bf16.predict_tensors(torch.rand(2, 3, 24, 40))
    seg.predict_tensors(torch.rand(2, 3, 24, 40))
    assert Backbone.autocast_seen == [True, True, False, False]   # flip on: two forwards each
