"""Shared fixtures of the backbone tests: a hermetic offline environment and fast random timm models."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No weights anywhere: empty weights dir, torch hub and Hugging Face caches; hub offline."""
    for var, sub in (("HF_HOME", "hf"), ("TORCH_HOME", "torch"), ("UNSUPSEG_WEIGHTS_DIR", "weights")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _random_timm(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with random tensors, filled fast (timm's own init takes seconds for a ViT-B)."""
    if "dinov3" not in arch:  # timm's init is wasted work here; the Eva models (DINOv3) cannot skip it
        kwargs["weight_init"] = "skip"
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", **kwargs)
    model.to_empty(device="cpu")
    reinit_non_persistent_buffers(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.05, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return model.eval()


@pytest.fixture
def random_timm():
    return _random_timm


def dino_interpolate_pos_encoding(pos_embed, x, w, h, patch_size):
    """facebookresearch/dino vision_transformer.py, VisionTransformer.interpolate_pos_encoding, verbatim
    but for taking the table and patch size as arguments (w, h are the image's dims 2 and 3)."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    # we add a small number to avoid floating point error in the interpolation
    # see discussion at https://github.com/facebookresearch/dino/issues/8
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _reference_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch features B x D x h x w of a timm ViT holding some weights, computed independently of
    unsupseg: timm's own forward for dynamic-size models (DINOv3 RoPE; DINOv2-reg, whose exact-size
    antialiased resampling timm's dynamic size reproduces), else DINO's prepare_tokens (also DINOv2's
    without registers) followed by the timm blocks and final norm."""
    patch = model.patch_embed.patch_size[0]
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    batch, _, w, h = x.shape
    with torch.no_grad():
        if getattr(model, "dynamic_img_size", False):
            tokens = model.forward_features(x)
        else:
            x = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
            x = torch.cat((model.cls_token.expand(batch, -1, -1), x), dim=1)
            x = x + dino_interpolate_pos_encoding(model.pos_embed, x, w, h, patch)
            tokens = model.norm(model.blocks(x))
    return tokens[:, model.num_prefix_tokens:].transpose(1, 2).reshape(batch, -1, w // patch, h // patch)


@pytest.fixture
def reference_features():
    return _reference_features


@pytest.fixture
def images():
    def make(height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))

    return make
