"""Importing a released STEGO Lightning checkpoint: safe reading, run directory, reference predictions.

The checkpoint is built in the published layout: torch.save of Lightning's checkpoint dict whose
``hyper_parameters`` hold ``n_classes`` and the training ``cfg`` as a real OmegaConf DictConfig, a
``state_dict`` with the DINO ViT under ``net.model.*`` (here a random ViT-S/8), the head
``net.cluster1/2``, both probes, the unused decoder and training cluster probe, and Lightning's
bookkeeping (Lightning 1.4 keys callback states by the callback class).
"""

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import unsupseg.api as api
from unsupseg.backbones import build_backbone
from unsupseg.errors import CheckpointError, RunDirError
from unsupseg.importers.stego import import_stego, read_lightning_checkpoint

omegaconf = pytest.importorskip("omegaconf")

D, R, C = 384, 5, 4          # ViT-S features, code dim, classes


@pytest.fixture(scope="module")
def vit():
    return build_backbone("dino_vits8", weights="random")


@pytest.fixture
def lightning_module(monkeypatch):
    """The class Lightning 1.4 pickles as a callback-state key, importable by name as Lightning's."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint


def _checkpoint(path, vit, lightning_module, extra=None, classes=C):
    C = classes   # noqa: N806 (the probes' class count)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)   # noqa: E731
    state = {f"net.model.{k}": v.clone() for k, v in vit.encoder.model.state_dict().items()}
    state.update({
        "net.cluster1.0.weight": rand(R, D, 1, 1), "net.cluster1.0.bias": rand(R),
        "net.cluster2.0.weight": rand(D, D, 1, 1) * 0.05, "net.cluster2.0.bias": rand(D),
        "net.cluster2.2.weight": rand(R, D, 1, 1) * 0.05, "net.cluster2.2.bias": rand(R),
        "train_cluster_probe.clusters": rand(C, R), "cluster_probe.clusters": rand(C, R),
        "linear_probe.weight": rand(C, R, 1, 1), "linear_probe.bias": rand(C),
        "decoder.weight": rand(D, R, 1, 1), "decoder.bias": rand(D),
    })
    cfg = omegaconf.OmegaConf.create({
        "output_root": "../", "dataset_name": "potsdam", "model_type": "vit_small", "dino_patch_size": 8,
        "dim": R, "projection_type": "nonlinear", "extra_clusters": 0, "pointwise": True, "dropout": True,
        "zero_clamp": True, "stabalize": False, "feature_samples": 11, "neg_samples": 5, "num_neighbors": 7,
        "lr": 5e-4, "batch_size": 16, "max_steps": 5000, "res": 224, "correspondence_weight": 1.0, "rec_weight": 0.0,
        "pos_intra_weight": 0.67, "pos_inter_weight": 0.25, "neg_inter_weight": 0.63,
        "pos_intra_shift": 0.08, "pos_inter_shift": 0.02, "neg_inter_shift": 0.76,
        "crop_ratio": 0.5, "hydra": {"run": {"dir": "."}}, "betas": [0.9, 0.999],
    })
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    checkpoint = {
        "epoch": 12, "global_step": 5000, "pytorch-lightning_version": "1.4.9",
        "state_dict": state,
        "callbacks": {lightning_module: {"monitor": "test/cluster/mIoU", "best_model_score": torch.tensor(0.6),
                                         "best_model_path": "checkpoints/epoch=12.ckpt"}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
        "hparams_name": "kwargs", "hyper_parameters": {"n_classes": C, "cfg": cfg},
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return state


def test_reader_turns_omegaconf_into_plain_data(tmp_path, vit, lightning_module):
    _checkpoint(tmp_path / "s.ckpt", vit, lightning_module)
    content = read_lightning_checkpoint(tmp_path / "s.ckpt")
    cfg = content["hyper_parameters"]["cfg"]
    assert type(cfg) is dict and cfg["dim"] == R and cfg["hydra"] == {"run": {"dir": "."}}
    assert cfg["betas"] == [0.9, 0.999] and cfg["pointwise"] is True and cfg["neg_inter_shift"] == 0.76


def test_import_predicts_as_the_reference_test_path(tmp_path, vit, lightning_module):
    state = _checkpoint(tmp_path / "s.ckpt", vit, lightning_module)
    out = import_stego(tmp_path / "s.ckpt", tmp_path / "run")
    run = api.rundir.load(out)
    assert (out / "backbone.safetensors").is_file()
    assert run.config.method == "stego" and run.config.clusters == C
    assert run.config.backbone.name == "dino_vits8" and run.config.backbone.weights == str(
        (out / "backbone.safetensors").resolve()
    )
    assert run.config.test.alpha == 2.0 and run.config.test.flip and run.config.test.crf
    assert run.config.params["shift_rand"] == 0.76 and run.config.params["dim"] == R
    assert torch.equal(run.state["cluster_probe"], state["cluster_probe.clusters"])

    seg = api.load(out)
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    prediction = seg.predict_tensor(image, crf=False)

    # reference: tokens -> cluster1 + cluster2 -> flip average -> bilinear upsample -> cosine -> argmax
    def conv(x, key):
        return F.conv2d(x, state[f"{key}.weight"], state[f"{key}.bias"])

    def code(tokens):
        return conv(tokens, "net.cluster1.0") + conv(F.relu(conv(tokens, "net.cluster2.0")), "net.cluster2.2")

    x = image[None]
    c = (code(vit(x)) + code(vit(x.flip(-1))).flip(-1)) / 2
    c = F.interpolate(c, size=(32, 48), mode="bilinear", align_corners=False)
    cos = torch.einsum("bchw,kc->bkhw", F.normalize(c, dim=1), F.normalize(state["cluster_probe.clusters"], dim=1))
    assert torch.equal(torch.from_numpy(prediction.labels), cos.argmax(1)[0])
    assert torch.allclose(prediction.probabilities, torch.softmax(2.0 * cos, dim=1)[0], atol=1e-5)


def test_import_refuses_a_busy_output_folder(tmp_path, vit, lightning_module):
    _checkpoint(tmp_path / "s.ckpt", vit, lightning_module)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(RunDirError, match="not empty"):
        import_stego(tmp_path / "s.ckpt", tmp_path / "run")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_other_objects_is_refused_without_running_them(tmp_path, vit, lightning_module):
    marker = tmp_path / "executed"
    _checkpoint(tmp_path / "evil.ckpt", vit, lightning_module, extra={"loops": _Exploit(marker)})
    with pytest.raises(CheckpointError) as err:
        import_stego(tmp_path / "evil.ckpt", tmp_path / "run")
    assert "evil.ckpt" in str(err.value) and f"{os.system.__module__}.system" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x02}q\x00.")       # a bare pickle, not torch's zip format
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        read_lightning_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lightning_checkpoint(tmp_path / "missing.ckpt")


def test_evaluate_scores_the_imported_linear_probe(tmp_path, vit, lightning_module):
    """`evaluate --probe linear`: code -> flip average -> bilinear upsampling -> linear probe -> argmax,
    scored with the identity mapping (no Hungarian), as STEGO's linear numbers."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from tests.methods.test_leopart import _camvid_tree
    from unsupseg.cli import app
    from unsupseg.data import build_dataset

    state = _checkpoint(tmp_path / "s.ckpt", vit, lightning_module, classes=11)
    out = import_stego(tmp_path / "s.ckpt", tmp_path / "run")
    imported = api.rundir.load(out)
    imported.config.test.resolution = 48   # the released 320 makes a ViT-S/8 slow on a CPU; the path is the same
    api.rundir.save(out, imported.config, imported.state, imported.meta)   # saved again: meta.json's checksums follow
    root = _camvid_tree(tmp_path / "camvid", counts=(("val", 2),), size=(32, 48))
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(out),
            "--dataset",
            "camvid",
            "--root",
            str(root),
            "--split",
            "val",
            "--probe",
            "linear",
            "--no-crf",
            "--json",
            str(tmp_path / "linear.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "linear probe" in result.output and "matching identity" in result.output
    report = json.loads((tmp_path / "linear.json").read_text())

    def conv(x, key):
        return F.conv2d(x, state[f"{key}.weight"], state[f"{key}.bias"])

    def code(tokens):
        return conv(tokens, "net.cluster1.0") + conv(F.relu(conv(tokens, "net.cluster2.0")), "net.cluster2.2")

    confusion = np.zeros((11, 11), dtype=np.int64)
    data = build_dataset("camvid", root, "val")
    for i in range(len(data)):
        image, label = data.eval_preprocess(48, multiple=8).apply(data[i].image, data[i].label)
        x = image[None]
        c = (code(vit(x)) + code(vit(x.flip(-1))).flip(-1)) / 2
        c = F.interpolate(c, size=label.shape, mode="bilinear", align_corners=False)
        pred = conv(c, "linear_probe").argmax(1)[0]
        valid = label >= 0
        np.add.at(confusion, (pred[valid].numpy(), label[valid].numpy()), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    assert report["matching"] == "identity" and report["probe"] == "linear" and report["num_clusters"] == 11
    # float32 logits summed in another order (einsum vs conv2d) may flip a near-tie pixel or two
    assert np.abs(np.array(report["confusion"]) - confusion).sum() <= 1e-4 * confusion.sum()
    assert report["miou"] == pytest.approx(100 * iou.mean(), abs=0.01)
    assert report["pixel_accuracy"] == pytest.approx(100 * tp.sum() / confusion.sum(), abs=0.01)


def test_linear_probe_needs_one(tmp_path, vit, lightning_module):
    from unsupseg.errors import ConfigError

    _checkpoint(tmp_path / "s.ckpt", vit, lightning_module)   # 4 classes: not CamVid's 11
    out = import_stego(tmp_path / "s.ckpt", tmp_path / "run")
    from tests.methods.test_leopart import _camvid_tree

    root = _camvid_tree(tmp_path / "camvid", counts=(("val", 1),), size=(32, 48))
    with pytest.raises(ConfigError, match="4 classes"):
        api.evaluate(out, dataset="camvid", root=root, split="val", probe="linear", crf=False)
    with pytest.raises(ConfigError, match="probe must be"):
        api.evaluate(out, dataset="camvid", root=root, split="val", probe="cluster")
