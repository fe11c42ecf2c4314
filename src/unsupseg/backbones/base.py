"""The frozen-backbone contract shared by every family, and the static description of a backbone."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from unsupseg.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the registry knows about one backbone name before building it."""

    name: str
    family: str  # dino, dinov2, dinov3, ibot, mae, msn, efficientnet
    arch: str  # timm model name
    dim: int
    stride: int
    licence: str
    files: tuple[str, ...]  # file names (glob patterns) looked for in UNSUPSEG_WEIGHTS_DIR / torch hub
    url: str  # where to get the official weights by hand
    timm_tag: str | None = None  # timm pretrained tag, i.e. Hugging Face repo "timm/<tag>"


def check_images(images: Tensor, stride: int, name: str) -> None:
    """Raise ConfigError unless ``images`` is a float B x 3 x H x W batch with H, W multiples of ``stride``."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"backbone {name!r} expects images of shape B x 3 x H x W, got {shape}")
    if not images.is_floating_point():
        raise ConfigError(
            f"backbone {name!r} expects float images in [0, 1], got dtype {images.dtype}; "
            "convert with images.float() / 255"
        )
    height, width = images.shape[-2:]
    if height == 0 or width == 0 or height % stride or width % stride:
        raise ConfigError(
            f"backbone {name!r} needs H and W to be positive multiples of its stride {stride}, "
            f"got {height} x {width}; choose a resolution that is a multiple of {stride}"
        )


def autocast_for(images: Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16 where bf16 is missing) autocast on CUDA; nothing elsewhere (CPU autocast is slow)."""
    if not (enabled and images.is_cuda):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class Backbone(torch.nn.Module):
    """A frozen dense feature extractor.

    ``forward(images)`` takes B x 3 x H x W float RGB in [0, 1] (NOT normalised: the backbone applies
    ``mean``/``std`` itself), H and W multiples of ``stride``, and returns float32
    B x dim x H/stride x W/stride. The module never trains: ``train()`` keeps it in eval mode, no
    parameter requires grad, and the forward runs under ``torch.no_grad`` (not ``inference_mode``, so
    its outputs can enter autograd graphs as constants). On CUDA it runs under autocast (bf16, or fp16
    where bf16 is unsupported) unless ``autocast`` is set to False.

    ``weights_id`` identifies the loaded tensors: ``sha256-<16 hex>`` of the state dict, or
    ``random-<seed>`` for random init. ``options`` holds the architecture options that change the
    features without changing the tensors (e.g. ``num_heads``); a feature cache key needs
    ``name``, ``weights_id`` and ``options``.

    ``center`` (option ``center=True``): every image's mean feature is subtracted from its tokens, so
    that what the tokens share within one photo (its overall look) no longer separates photos and
    clusters follow the parts of each photo instead.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_id: str,
        options: dict,
    ):
        super().__init__()
        self.name = spec.name
        self.dim = spec.dim
        self.stride = spec.stride
        self.mean = mean
        self.std = std
        self.weights_id = weights_id
        self.options = dict(options)
        self.autocast = True

    @property
    def center(self) -> bool:
        return self.options.get("center", False)

    def centered(self, on: bool = True) -> Backbone:
        """Subtract each image's mean feature from its tokens (held in ``options``, so cache keys differ)."""
        self.options.pop("center", None)
        if on:
            self.options["center"] = True
        return self

    def freeze(self) -> Backbone:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen by contract: a parent module's .train() must not switch dropout / drop-path back on.
        return super().train(False)

    def extract(self, images: Tensor) -> Tensor:
        """Family-specific features of checked [0, 1] images; B x dim x H/stride x W/stride."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_images(images, self.stride, self.name)
        with autocast_for(images, self.autocast):
            features = self.extract(images).float()
        return features - features.mean((2, 3), keepdim=True) if self.center else features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, stride={self.stride}, weights_id={self.weights_id!r}"
