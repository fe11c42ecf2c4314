"""Vision transformers (DINO, DINOv2, DINOv3, iBOT, MAE, MSN) on timm models.

Features are the last block's tokens after the final LayerNorm, class and register tokens dropped,
row-major. Position handling for grids other than the training grid follows each family's own code:
DINO, iBOT, MSN, MAE and DINOv2 resample the patch position table bicubically with DINO's
``scale_factor = (n + 0.1) / M``; DINOv2 with registers resamples to the exact size with antialiasing
(its hub models set ``interpolate_offset=0, interpolate_antialias=True``); DINOv3 has no table but
RoPE, which timm's Eva computes for any grid.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import timm
import torch
import torch.nn.functional as F
from timm.models import eva, vision_transformer
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import Tensor, nn

from unsupseg.backbones.base import Backbone, BackboneSpec, autocast_for, check_images
from unsupseg.backbones.weights import load_strict, state_id
from unsupseg.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pre-training parts that published files carry beside the encoder: projection heads (DINO/iBOT
# "head.", MSN "fc."), mask tokens (iBOT "masked_embed", MAE/DINOv2/DINOv3 "mask_token"), MAE's decoder.
_PRETRAIN_ONLY = ("head.", "fc.", "mask_token", "masked_embed", "decoder", "lm_head.")


def interpolate_pos_embed(patch_pos: Tensor, grid: tuple[int, int], registers: bool = False) -> Tensor:
    """The patch part (1 x M*M x D) of a position table resampled to ``grid`` as the original code does:
    DINO's interpolate_pos_encoding (also iBOT, MSN, MAE, DINOv2), or DINOv2-with-registers' (its hub
    models set interpolate_offset=0, interpolate_antialias=True). Bicubic, in float32."""
    side, dim = math.isqrt(patch_pos.shape[1]), patch_pos.shape[2]
    if tuple(grid) == (side, side):
        return patch_pos
    table = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if registers:
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True)
    else:
        # The "+0.1" keeps floor(M * scale) from landing one cell short through float error (DINO
        # issue #8); a scale factor rather than a size also moves the sampling positions, so keep it.
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        table = F.interpolate(table, scale_factor=scale, mode="bicubic")
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(patch_pos.dtype)


class ViTEncoder(nn.Module):
    """A timm ViT (``.model``) run with its family's position handling; trainable unless frozen.

    ``forward(images, return_attention=False)`` takes B x 3 x H x W RGB in [0, 1] (normalised here
    with ImageNet statistics), H and W multiples of ``patch_size``, and returns the patch features
    B x dim x H/p x W/p; with ``return_attention`` also the last block's CLS->patch attention
    B x heads x H/p x W/p (softmax over all tokens including CLS and registers, then only the patch
    columns kept). Its state dict is the timm one under ``model.``, the layout Leopart saves.
    """

    def __init__(self, model: nn.Module, family: str, name: str = "vit"):
        super().__init__()
        self.model = model
        self.family = family
        self.name = name
        self.patch_size = model.patch_embed.patch_size[0]
        self.dim = model.embed_dim
        self.num_heads = model.blocks[-1].attn.num_heads
        self.num_prefix_tokens = model.num_prefix_tokens
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_images(images, self.patch_size, self.name)
        batch, grid = images.shape[0], (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        x = (images - self._mean) / self._std
        with _capture_last_attention(self.model, return_attention) as captured:
            tokens = self._tokens(x, grid)
        features = tokens[:, self.num_prefix_tokens:].transpose(1, 2).reshape(batch, -1, *grid)
        if not return_attention:
            return features
        attention = captured[-1][:, :, 0, self.num_prefix_tokens:]
        return features, attention.reshape(batch, attention.shape[1], *grid)

    def _tokens(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        model = self.model
        if self.family == "dinov3":
            return model.forward_features(x)  # Eva with dynamic_img_size builds RoPE for the grid
        x = model.patch_embed.norm(model.patch_embed.proj(x).flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        if model.no_embed_class:  # timm's DINOv2 with registers: the table covers the patches only
            x = torch.cat(prefix + [x + self._pos_embed(grid, 0)], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self._pos_embed(grid, model.num_prefix_tokens)
        x = model.norm_pre(model.pos_drop(x))
        return model.norm(model.blocks(x))

    def _pos_embed(self, grid: tuple[int, int], num_prefix: int) -> Tensor:
        table = self.model.pos_embed
        patches = interpolate_pos_embed(table[:, num_prefix:], grid, registers=self.model.reg_token is not None)
        return torch.cat([table[:, :num_prefix], patches], dim=1)


@contextlib.contextmanager
def _capture_last_attention(model: nn.Module, enabled: bool) -> Iterator[list[Tensor]]:
    """Collect the last block's softmaxed attention (the input of its attn_drop) during a forward."""
    captured: list[Tensor] = []
    if not enabled:
        yield captured
        return
    attn = model.blocks[-1].attn
    fused = attn.fused_attn
    attn.fused_attn = False  # the fused kernel never materialises the attention matrix
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()
        attn.fused_attn = fused


class ViTBackbone(Backbone):
    """Frozen ViT backbone; ``encoder`` is the ViTEncoder it runs."""

    def __init__(self, spec: BackboneSpec, encoder: ViTEncoder, weights_id: str):
        super().__init__(spec, IMAGENET_MEAN, IMAGENET_STD, weights_id, {"num_heads": encoder.num_heads})
        self.encoder = encoder
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    @torch.no_grad()
    def cls_attention(self, images: Tensor) -> Tensor:
        """Last block's CLS->patch attention, B x heads x H/stride x W/stride (float32)."""
        check_images(images, self.stride, self.name)
        with autocast_for(images, self.autocast):
            return self.encoder(images, return_attention=True)[1].float()


# ---------------------------------------------------------------- building


def random_vit(
    spec: BackboneSpec, seed: int, num_heads: int | None = None, drop_path_rate: float = 0.0
) -> ViTEncoder:
    """Seeded random init close to timm's: N(0, 0.02) weights and tokens, zero biases, unit norm and
    layer scales. Drawn from a private generator (the global RNG is untouched) and fast: timm's own
    truncated-normal init takes seconds per ViT-B on CPU."""
    model = _empty_model(spec, num_heads, drop_path_rate, qkv_bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return ViTEncoder(model, spec.family, spec.name)


def vit_from_state(
    spec: BackboneSpec,
    state: Mapping[str, Tensor],
    source: str,
    num_heads: int | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[ViTEncoder, str]:
    """Encoder holding ``state`` (any supported layout, already unwrapped) and its weights id."""
    state = dict(state)
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-1] != spec.stride:
        # timm's filters would silently resample the patch kernel: that is another backbone's file.
        raise WeightsError(
            f"{source} holds a ViT with {kernel.shape[-1]}-pixel patches, but {spec.name!r} has "
            f"{spec.stride}-pixel patches; choose the backbone name that matches the file"
        )
    qkv_bias = spec.family == "dinov3" and _dinov3_has_qkv_bias(state)
    model = _empty_model(spec, num_heads, drop_path_rate, qkv_bias)
    load_strict(model, _to_timm(spec, state, model, qkv_bias), source, spec.name)
    return ViTEncoder(model, spec.family, spec.name), state_id(model)


def _empty_model(spec: BackboneSpec, num_heads: int | None, drop_path_rate: float, qkv_bias: bool) -> nn.Module:
    """The timm architecture with uninitialised tensors (built on the meta device: timm's init takes
    seconds per ViT-B on CPU); computed non-persistent buffers (RoPE periods, DINOv3's fixed k-bias) are
    filled."""
    arch = spec.arch + ("_qkvb" if qkv_bias else "")
    kwargs = {"num_classes": 0, "global_pool": "", "drop_path_rate": drop_path_rate}
    if num_heads is not None:
        kwargs["num_heads"] = num_heads
    if spec.family != "dinov3":
        kwargs["weight_init"] = "skip"  # even on the meta device timm's init costs a few tenths of a second
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    model.to_empty(device="cpu")
    reinit_non_persistent_buffers(model)
    return model


def _dinov3_has_qkv_bias(state: Mapping[str, Tensor]) -> bool:
    # timm's DINOv3 models drop the (all-zero) qkv biases of the distilled ViT-S/B; keep them if not zero.
    return any(
        k.endswith("attn.q_bias") or (k.endswith("attn.qkv.bias") and bool(v.any())) for k, v in state.items()
    )


def _to_timm(spec: BackboneSpec, state: dict[str, Tensor], model: nn.Module, qkv_bias: bool) -> dict[str, Tensor]:
    """Published layout -> timm names; position tables resampled to the model's grid."""
    if spec.family == "dinov3":
        if not qkv_bias:
            state = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}
        state = eva.checkpoint_filter_fn(state, model)
    else:
        # Converts DINOv2 (LayerScale, registers, mask token) and resamples pos tables of another size.
        state = vision_transformer.checkpoint_filter_fn(state, model)
    return {k: v for k, v in state.items() if not k.startswith(_PRETRAIN_ONLY)}

