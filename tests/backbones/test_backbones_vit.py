"""ViT specifics: DINO position interpolation, the token path, CLS attention, trainable encoders."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from unsupseg.backbones import ViTEncoder, backbone_from_state_dict, build_backbone, build_vit_model
from unsupseg.backbones.vit import interpolate_pos_embed
from unsupseg.errors import ConfigError, WeightsError


def _tiny_vit(dynamic_img_size: bool = False) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, global_pool="",
        dynamic_img_size=dynamic_img_size,
    )  # fmt: skip
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)  # a rough table, so that the resampling method matters
    return model.eval()


@pytest.mark.parametrize("size", [(40, 56), (24, 48), (8, 64)])
def test_dino_position_interpolation_matches_dino_code(size, images, reference_features):
    model = _tiny_vit()
    encoder = ViTEncoder(model, "dino").eval()
    x = images(*size)
    with torch.no_grad():
        out, again = encoder(x), encoder(x)
        expected = reference_features(model, x)  # DINO's interpolate_pos_encoding, written out in conftest
        # timm's own resampling (exact size, antialiased) is a different method: the test can tell them apart.
        timm_dynamic = _tiny_vit(dynamic_img_size=True)
        timm_dynamic.load_state_dict(model.state_dict())
        timm_way = reference_features(timm_dynamic, x)
    assert out.shape == (1, 48, size[0] // 8, size[1] // 8)
    assert torch.equal(out, again)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - timm_way).abs().max() > 1e-3


def test_position_table_is_untouched_on_the_training_grid():
    table = torch.randn(1, 14 * 14, 8)
    for registers in (False, True):
        assert interpolate_pos_embed(table, (14, 14), registers) is table
        assert interpolate_pos_embed(table, (14, 15), registers).shape == (1, 14 * 15, 8)


def test_token_path_equals_timm_forward_on_the_training_grid(images):
    backbone = build_backbone("dino_vits16", weights="random")
    x = images(224, 224)
    model = backbone.encoder.model
    mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features((x - mean) / std)
    expected = tokens[:, 1:].transpose(1, 2).reshape(1, 384, 14, 14)
    torch.testing.assert_close(backbone(x), expected, rtol=1e-5, atol=1e-5)


def test_cls_attention_is_the_last_blocks_cls_row(images):
    model = _tiny_vit()
    encoder = ViTEncoder(model, "dino").eval()
    fused = model.blocks[-1].attn.fused_attn
    x = images(32, 32, batch=2)
    with torch.no_grad():
        features, attention = encoder(x, return_attention=True)
        # The last block's attention written out: softmax(q k^T / sqrt(d)) over all tokens, CLS row.
        tokens = model.patch_embed.proj((x - encoder._mean) / encoder._std).flatten(2).transpose(1, 2)
        tokens = model.blocks[:-1](torch.cat((model.cls_token.expand(2, -1, -1), tokens), dim=1) + model.pos_embed)
        block = model.blocks[-1]
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
        weights = (qkv[0] @ qkv[1].transpose(-2, -1) * 16**-0.5).softmax(dim=-1)
    assert attention.shape == (2, 3, 4, 4)
    torch.testing.assert_close(attention, weights[:, :, 0, 1:].reshape(2, 3, 4, 4), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(features, encoder(x))
    # The hook is gone and the fused kernel is back after the call.
    assert model.blocks[-1].attn.fused_attn == fused and not model.blocks[-1].attn.attn_drop._forward_hooks


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_cls_attention_drops_register_columns(name, images):
    backbone = build_backbone(name, weights="random")
    s = backbone.stride
    attention = backbone.cls_attention(images(3 * s, 5 * s))
    assert attention.shape == (1, 6, 3, 5)
    totals = attention.sum(dim=(-2, -1))
    assert (attention >= 0).all() and (totals < 1).all() and (totals > 0).all()  # CLS + 4 registers hold the rest


def test_trainable_encoder_round_trips_into_a_frozen_backbone(tmp_path, random_timm, images):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(random_timm("vit_small_patch16_224").state_dict(), path)
    encoder = build_vit_model("dino_vits16", weights=path, drop_path_rate=0.1)
    assert isinstance(encoder, ViTEncoder) and encoder.training
    assert all(p.requires_grad for p in encoder.parameters())
    assert encoder.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert encoder.model.blocks[0].drop_path1.__class__.__name__ == "Identity"  # linear 0 -> 0.1
    assert all(k.startswith("model.") for k in encoder.state_dict())  # Leopart's checkpoint layout

    x = images(48, 32, batch=2)
    features, attention = encoder(x, return_attention=True)
    assert features.shape == (2, 384, 3, 2) and attention.shape == (2, 6, 3, 2)
    features.square().mean().backward()
    assert encoder.model.pos_embed.grad is not None and encoder.model.blocks[0].attn.qkv.weight.grad is not None

    with torch.no_grad():
        encoder.model.pos_embed.add_(0.5)  # "fine-tuning"
    tuned = backbone_from_state_dict("dino_vits16", encoder.state_dict())
    with torch.no_grad():
        expected = encoder.eval()(x)
    torch.testing.assert_close(tuned(x), expected)
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    original_id = build_backbone("dino_vits16", weights=path).weights_id
    assert tuned.weights_id != original_id
    frozen = build_vit_model("dino_vits16", weights=path, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert backbone_from_state_dict("dino_vits16", frozen.state_dict()).weights_id == original_id


def test_build_vit_model_refuses_cnn_and_bad_state():
    with pytest.raises(ConfigError, match="needs a ViT"):
        build_vit_model("efficientnet_lite0", weights="random")
    with pytest.raises(WeightsError, match="missing keys"):
        backbone_from_state_dict("dino_vits16", {"model.cls_token": torch.zeros(1, 1, 384)})
