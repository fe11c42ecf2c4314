"""Every published weight-file layout loads into the same tensors as a reference timm model; bad files
are refused with a WeightsError naming the problem."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from unsupseg.backbones import build_backbone
from unsupseg.errors import WeightsError


def _save(obj, path):
    torch.save(obj, path)
    return path


def _noisy(state: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=generator) for k, v in state.items()}


def _check_loads_like(name, path, reference, reference_features, size, images):
    """The backbone built from ``path`` holds exactly the reference's tensors and gives its features."""
    backbone = build_backbone(name, weights=path)
    loaded, expected = backbone.encoder.model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():  # exact but for DINOv2-reg's cls_token (-pos0, +pos0 again)
        assert (loaded[key] - value).abs().max() <= 1e-6, key
    x = images(*size)
    torch.testing.assert_close(backbone(x), reference_features(reference, x), rtol=1e-4, atol=1e-4)
    return backbone


def test_dino_plain_state_dict(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch16_224")
    path = _save(reference.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    backbone = _check_loads_like("dino_vits16", path, reference, reference_features, (48, 80), images)
    assert backbone.weights_id.startswith("sha256-") and len(backbone.weights_id) == 7 + 16


def test_dino_full_checkpoint_uses_the_teacher(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch16_224")
    teacher = {f"module.backbone.{k}": v for k, v in reference.state_dict().items()}
    teacher["module.head.last_layer.weight_g"] = torch.ones(65536, 1)
    student = {f"module.backbone.{k}": v for k, v in _noisy(reference.state_dict(), 1).items()}
    checkpoint = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "epoch": 300,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }
    path = _save(checkpoint, tmp_path / "checkpoint.pth")
    _check_loads_like("dino_vits16", path, reference, reference_features, (48, 80), images)


def test_dinov2_plain_state_dict(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch14_dinov2")
    state = dict(reference.state_dict())
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, 384) and "blocks.0.ls1.gamma" in state
    state["mask_token"] = torch.zeros(1, 384)
    path = _save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    _check_loads_like("dinov2_vits14", path, reference, reference_features, (42, 70), images)


def test_dinov2_registers_state_dict(tmp_path, random_timm, reference_features, images):
    # timm folds the CLS position into cls_token and renames register_tokens; undo that for the file.
    reference = random_timm("vit_small_patch14_reg4_dinov2", dynamic_img_size=True)
    timm_state = reference.state_dict()
    cls_pos = torch.randn(1, 1, 384)
    state = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    state["register_tokens"] = timm_state["reg_token"]
    state["cls_token"] = timm_state["cls_token"] - cls_pos
    state["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, 384)
    path = _save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    # Off the 37 x 37 grid DINOv2-reg resamples to the exact size with antialiasing, as timm's dynamic size does.
    _check_loads_like("dinov2_vits14_reg", path, reference, reference_features, (56, 42), images)


def test_ibot_state_dict_drops_the_head(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_base_patch16_224")
    state = dict(reference.state_dict())
    state.update({"head.mlp.0.weight": torch.zeros(8, 768), "head.last_layer.weight_g": torch.ones(8, 1)})
    path = _save({"state_dict": state}, tmp_path / "checkpoint_teacher.pth")
    _check_loads_like("ibot_vitb16", path, reference, reference_features, (48, 80), images)


def test_msn_target_encoder(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch16_224")
    target = {f"module.{k}": v for k, v in reference.state_dict().items()}
    target["module.fc.fc1.weight"] = torch.zeros(16, 384)
    encoder = {f"module.{k}": v for k, v in _noisy(reference.state_dict(), 2).items()}
    checkpoint = {"encoder": encoder, "target_encoder": target, "prototypes": torch.zeros(8, 16), "epoch": 800}
    path = _save(checkpoint, tmp_path / "vits16_800ep.pth.tar")
    _check_loads_like("msn_vits16", path, reference, reference_features, (48, 80), images)


def test_mae_model_key(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_base_patch16_224")
    path = _save({"model": reference.state_dict()}, tmp_path / "mae_pretrain_vit_base.pth")
    _check_loads_like("mae_vitb16", path, reference, reference_features, (48, 80), images)


def _leopart_released(vit_state: dict, dim: int) -> dict:
    """The layout of leopart_vits16.ckpt / leopart_vitb8.ckpt: one flat dict, the student ViT under
    "model.", its projection head and prototypes under "model." too."""
    state = {f"model.{k}": v for k, v in vit_state.items()}
    for i, (out, inp) in enumerate(((2048, dim), (2048, 2048), (256, 2048))):
        state[f"model.projection_head.{2 * i}.weight"] = torch.zeros(out, inp)
        state[f"model.projection_head.{2 * i}.bias"] = torch.zeros(out)
    state["model.prototypes.weight"] = torch.zeros(300, 256)
    return state


@pytest.mark.parametrize(("name", "arch", "dim"), [("dino_vits16", "vit_small_patch16_224", 384),
                                                   ("dino_vitb8", "vit_base_patch8_224", 768)])
def test_leopart_released_checkpoint_loads_like_plain_dino(
    tmp_path, random_timm, reference_features, images, name, arch, dim
):
    reference = random_timm(arch)
    path = _save(_leopart_released(reference.state_dict(), dim), tmp_path / "leopart.ckpt")
    released = _check_loads_like(name, path, reference, reference_features, (48, 80), images)
    plain = build_backbone(name, weights=_save(reference.state_dict(), tmp_path / "plain.pth"))
    x = images(48, 80)
    assert torch.equal(released(x), plain(x))


def test_leopart_training_checkpoint_uses_the_student(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch16_224")
    state = _leopart_released(reference.state_dict(), 384)
    state.update({f"teacher.{k}": v for k, v in _noisy(reference.state_dict(), 3).items()})
    path = _save({"state_dict": state, "epoch": 50, "global_step": 1000}, tmp_path / "last.ckpt")
    _check_loads_like("dino_vits16", path, reference, reference_features, (48, 80), images)


def test_timm_state_dict_as_safetensors(tmp_path, random_timm, reference_features, images):
    reference = random_timm("vit_small_patch16_224")
    path = tmp_path / "dino_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    _check_loads_like("dino_vits16", path, reference, reference_features, (48, 80), images)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_dinov3_original_layout(tmp_path, random_timm, reference_features, images, qkv_bias):
    reference = random_timm("vit_small_patch16_dinov3" + ("_qkvb" if qkv_bias else ""))
    timm_state = reference.state_dict()
    renames = {"reg_token": "storage_tokens", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
    state = {}
    for key, value in timm_state.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        for timm_name, original_name in renames.items():
            key = key.replace(timm_name, original_name)
        state[key] = value
    for i in range(12):  # the original keeps one qkv bias (k part masked to zero) and its mask
        zeros = torch.zeros(384)
        q, v = (timm_state[f"blocks.{i}.attn.{p}_bias"] for p in "qv") if qkv_bias else (zeros, zeros)
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, zeros, v])
        state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(384), torch.zeros(384), torch.ones(384)])
    state.update({"mask_token": torch.zeros(1, 384), "rope_embed.periods": torch.ones(16)})
    path = _save(state, tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    _check_loads_like("dinov3_vits16", path, reference, reference_features, (48, 80), images)


def test_position_table_of_another_size_is_resampled(tmp_path, random_timm):
    reference = random_timm("vit_small_patch16_224")
    state = dict(reference.state_dict())
    state["pos_embed"] = torch.randn(1, 1 + 7 * 7, 384)  # e.g. trained at 112 px
    backbone = build_backbone("dino_vits16", weights=_save(state, tmp_path / "w.pth"))
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(14, 14), old_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(backbone.encoder.model.pos_embed, expected)


# ---------------------------------------------------------------- refusals


@pytest.fixture
def dino_state(random_timm):
    return dict(random_timm("vit_small_patch16_224").state_dict())


def test_missing_key_is_named(tmp_path, dino_state):
    del dino_state["blocks.3.mlp.fc1.bias"]
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.3\.mlp\.fc1\.bias") as err:
        build_backbone("dino_vits16", weights=_save(dino_state, tmp_path / "w.pth"))
    assert "w.pth" in str(err.value)


def test_unexpected_key_is_named(tmp_path, dino_state):
    dino_state["blocks.0.attn.extra_scale"] = torch.ones(1)
    with pytest.raises(WeightsError, match=r"unexpected keys: blocks\.0\.attn\.extra_scale"):
        build_backbone("dino_vits16", weights=_save(dino_state, tmp_path / "w.pth"))


def test_weights_of_another_architecture_are_refused(tmp_path, dino_state):
    with pytest.raises(WeightsError, match=r"shape mismatch: .*file \(1, 1, 384\), model \(1, 1, 768\)"):
        build_backbone("dino_vitb16", weights=_save(dino_state, tmp_path / "w.pth"))


def test_patch_size_of_another_backbone_is_refused_not_resampled(tmp_path):
    path = _save({"patch_embed.proj.weight": torch.zeros(384, 3, 8, 8)}, tmp_path / "dino_deitsmall8_pretrain.pth")
    with pytest.raises(WeightsError, match="8-pixel patches, but 'dino_vits16' has 16-pixel patches"):
        build_backbone("dino_vits16", weights=path)


_MARKER = []


def _record_unpickling():
    _MARKER.append("unpickled")
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickle_with_arbitrary_object_is_refused(tmp_path, dino_state):
    path = _save({"state_dict": dino_state, "callback": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="refusing to load .*evil.ckpt.*never unpickles"):
        build_backbone("dino_vits16", weights=path)
    assert _MARKER == []


@pytest.mark.parametrize(
    "content, message",
    [(b"not a checkpoint", "not a PyTorch weights file|cannot read"), (None, "holds no state dict")],
)
def test_files_without_weights_are_refused(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content is None:
        torch.save({"epoch": 3, "note": "no tensors"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        build_backbone("dino_vits16", weights=path)


def test_missing_file_says_how_to_pass_weights(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*--backbone-weights"):
        build_backbone("dino_vits16", weights=tmp_path / "nope.pth")
