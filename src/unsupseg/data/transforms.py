"""Deterministic test/train-time geometry: resize, center crop, to tensor (docs/protocols.md §5.2-5.3).

Resizing is done by Pillow (as torchvision does for PIL images), so "nearest" reproduces the
STEGO/CAUSE reference exactly and "bilinear" is antialiased. Labels are always resized nearest,
with the same Pillow sampling grid as the image. Normalisation (mean/std) is the backbone's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from unsupseg.errors import ConfigError, DataError

MODES = ("short", "short_crop", "square", "none")
INTERPOLATIONS = ("bilinear", "nearest")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
# In mode "short" the longer side is capped at this many times the resolution: a 4 x 1000 strip would
# otherwise become 80,000 pixels long (gigabytes of features) for a few rows of content.
LONG_SIDE_FACTOR = 8


@dataclass(frozen=True)
class Preprocess:
    """Geometry of one image (and its label) before the backbone.

    Modes:
      - ``short``: shorter side → ``resolution``, aspect kept, longer side rounded half up; the longer
        side is capped at ``LONG_SIDE_FACTOR`` x ``resolution`` (the shorter then goes below ``resolution``,
        not below ``multiple``).
      - ``short_crop``: shorter side → ``resolution`` (longer side truncated, as torchvision's
        ``Resize(int)``), then a central ``resolution`` x ``resolution`` crop (torchvision's
        ``center_crop`` offsets).
      - ``square``: direct resize to ``resolution`` x ``resolution`` (aspect not kept).
      - ``none``: no resize (``resolution`` is ignored and may be None).
    Then, if ``multiple`` > 1, the few pixels that keep a side from being a multiple of
    ``multiple`` are center-cropped away (same offset rule), so the output can be tiled by the
    backbone's patches. Nothing is padded, and an image already at a valid size is returned
    bit-identical.
    """

    resolution: int | None
    mode: str = "short"
    interpolation: str = "bilinear"
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"preprocess mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if not _is_positive_int(self.multiple):
            raise ConfigError(f"preprocess multiple must be a positive integer, got {self.multiple!r}")
        if self.mode == "none":
            if self.resolution is not None and not _is_positive_int(self.resolution):
                raise ConfigError(
                    f"preprocess resolution must be a positive integer or None, got {self.resolution!r}"
                )
        elif not _is_positive_int(self.resolution):
            raise ConfigError(
                f"preprocess resolution must be a positive integer for mode {self.mode!r}, "
                f"got {self.resolution!r}"
            )
        elif self.resolution < self.multiple:
            raise ConfigError(
                f"preprocess resolution {self.resolution} is smaller than multiple {self.multiple}"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after the resize step, before any crop."""
        r = self.resolution
        if self.mode == "none":
            return height, width
        if self.mode == "square":
            return r, r
        if self.mode == "short":
            if self.long_side_capped(height, width):
                scale = LONG_SIDE_FACTOR * r / max(height, width)
                return max(self.multiple, round(height * scale)), max(self.multiple, round(width * scale))
            return self._short_size(height, width)
        # short_crop: torchvision's int(r * long / short) truncation
        if height <= width:
            return r, width * r // height
        return height * r // width, r

    def _short_size(self, height: int, width: int) -> tuple[int, int]:
        # integer round-half-up of long * r / short, exact for any size
        r = self.resolution
        if height <= width:
            return r, (2 * width * r + height) // (2 * height)
        return (2 * height * r + width) // (2 * width), r

    def long_side_capped(self, height: int, width: int) -> bool:
        """True when mode ``short`` caps the longer side of a ``height`` x ``width`` image."""
        return self.mode == "short" and max(self._short_size(height, width)) > LONG_SIDE_FACTOR * self.resolution

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) of the crop applied to a resized image."""
        top = left = 0
        if self.mode == "short_crop":
            top, left = _center_offset(height, self.resolution), _center_offset(width, self.resolution)
            height = width = self.resolution
        crop_h, crop_w = height - height % self.multiple, width - width % self.multiple
        return top + _center_offset(height, crop_h), left + _center_offset(width, crop_w), crop_h, crop_w

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the tensors ``apply`` returns for an input of ``height`` x ``width``."""
        _, _, crop_h, crop_w = self.crop_box(*self.resized_size(height, width))
        return crop_h, crop_w

    def apply(
        self, image: Image.Image, label: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (3 x H x W float32 in [0, 1], H x W int64 label or None)."""
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise DataError(
                f"preprocess expects an RGB PIL image (see unsupseg.data.load_image), got "
                f"{getattr(image, 'mode', type(image).__name__)!r}"
            )
        width, height = image.size
        if label is not None:
            label = np.asarray(label)
            if label.shape != (height, width):
                raise DataError(
                    f"label of shape {label.shape} does not match its image of size "
                    f"{height}x{width} (H x W)"
                )
        new_h, new_w = self.resized_size(height, width)
        if (new_h, new_w) != (height, width):
            image = image.resize((new_w, new_h), _RESAMPLE[self.interpolation])
            if label is not None:
                label = _resize_label_nearest(label, new_h, new_w)
        top, left, crop_h, crop_w = self.crop_box(new_h, new_w)
        if crop_h == 0 or crop_w == 0:
            raise DataError(
                f"image of size {height}x{width} (H x W) is too small for {self}: nothing is left "
                f"after cropping to a multiple of {self.multiple}"
            )
        if (crop_h, crop_w) != (new_h, new_w):
            image = image.crop((left, top, left + crop_w, top + crop_h))
            if label is not None:
                label = label[top : top + crop_h, left : left + crop_w]
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        image_tensor = pixels.to(torch.float32).div_(255.0)
        label_tensor = None if label is None else torch.from_numpy(label.astype(np.int64, copy=True))
        return image_tensor, label_tensor


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _center_offset(size: int, crop: int) -> int:
    # torchvision center_crop: int(round((size - crop) / 2.0)), Python's round (half to even)
    return int(round((size - crop) / 2.0))


def _resize_label_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    # Pillow's nearest on a 32-bit integer image samples exactly the pixels it samples in the image
    if label.dtype.kind not in "iu":
        raise DataError(f"label values must be integers, got dtype {label.dtype}")
    info = np.iinfo(np.int32)
    if label.size and (int(label.min()) < info.min or int(label.max()) > info.max):
        raise DataError("label values do not fit in 32 bits")
    resized = Image.fromarray(label.astype(np.int32)).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(resized, dtype=np.int64)
