"""Registry of frozen dense feature extractors built on timm models, and their weight loading.

>>> backbone = build_backbone("dino_vits8")             # weights found locally or downloaded
>>> features = backbone(images)                         # B x 3 x H x W in [0, 1] -> B x 384 x H/8 x W/8

Names: see ``list_backbones()``. ``weights="auto"`` searches ``$UNSUPSEG_WEIGHTS_DIR``, the installed
package (efficientnet_lite0), the torch hub and Hugging Face caches, then downloads via the hub;
``weights="random"`` gives a seeded random init; a path loads that file in any published layout
(see ``unsupseg.backbones.weights``).
"""

from unsupseg.backbones.base import Backbone, BackboneSpec
from unsupseg.backbones.efficientnet import EfficientNetBackbone
from unsupseg.backbones.registry import (
    BackboneInfo,
    backbone_from_state_dict,
    build_backbone,
    build_vit_model,
    get_backbone_info,
    get_spec,
    list_backbones,
)
from unsupseg.backbones.vit import ViTBackbone, ViTEncoder
from unsupseg.backbones.weights import WEIGHTS_DIR_ENV

__all__ = [
    "WEIGHTS_DIR_ENV",
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "EfficientNetBackbone",
    "ViTBackbone",
    "ViTEncoder",
    "backbone_from_state_dict",
    "build_backbone",
    "build_vit_model",
    "get_backbone_info",
    "get_spec",
    "list_backbones",
]
