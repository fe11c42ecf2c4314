"""Reading image and label files into the library's canonical forms.

Images come back as 8-bit RGB ``PIL.Image``; labels as the raw integer array stored in the file
(benchmark label maps are applied by the datasets). Every decode problem becomes a ``DataError``
naming the file, so callers can skip or report one bad file without catching Pillow's many
exception types themselves.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unsupseg.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")   # gif: its first frame

# Photos above this many pixels are downscaled on load (with a warning): segmentation runs at a few
# hundred pixels anyway, and a 100-megapixel decode costs gigabytes. Pillow's own decompression-bomb
# limit still refuses absurd sizes.
DEFAULT_MAX_PIXELS = 40_000_000

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_LABEL_MODES = {"L", "P", "1", "I", *_SIXTEEN_BIT_MODES}


class DataWarning(UserWarning):
    """A data file was skipped or needs attention; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name has one of the supported image extensions (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def check_image_header(path: str | os.PathLike) -> tuple[int, int]:
    """Cheaply check that ``path`` looks like a readable image: returns ``(width, height)``.

    Only the header is parsed (no pixel decode), so a truncated file passes here and fails later
    in ``load_image``.
    """
    path = Path(path)
    _check_nonempty(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise DataError(f"{path}: not a readable image ({_describe(exc)})") from exc
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image has an empty size {width}x{height}")
    return width, height


def image_size(path: str | os.PathLike, *, exif_transpose: bool = True) -> tuple[int, int]:
    """``(width, height)`` of the image ``load_image`` returns, from the header alone (EXIF orientations
    5-8 swap the sides); used to plan token grids without decoding."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if exif_transpose and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise DataError(f"{path}: not a readable image ({_describe(exc)})") from exc
    return width, height


def load_image(path: str | os.PathLike, *, exif_transpose: bool = True, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file completely and return it as 8-bit RGB.

    - Images larger than ``max_pixels`` (None: no limit) are downscaled, keeping the aspect ratio,
      with a DataWarning naming the file (JPEGs decode directly at a reduced scale).

    - EXIF orientation is applied unless ``exif_transpose=False`` (labelled benchmarks pass False:
      their annotations are drawn on the stored pixel grid, as the reference code reads them).
    - Transparent images (RGBA, LA, palette with transparency) are composited onto white.
    - 16-bit images are scaled by the full 16-bit range (``v * 255 / 65535``), not clipped;
      mode "I" (32-bit integer, what some 16-bit files decode to) is treated the same way.
    - Float images with values in [0, 1] are scaled by 255; other float images are min-max
      scaled to [0, 255].
    """
    path = Path(path)
    _check_nonempty(path)
    try:
        with Image.open(path) as img:
            too_big = max_pixels is not None and img.width * img.height > max_pixels
            if too_big:
                scale = (max_pixels / (img.width * img.height)) ** 0.5
                target = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
                original = img.size
                img.draft("RGB", target)   # JPEG: decode at 1/2, 1/4 or 1/8 scale, no-op otherwise
            img.load()  # full decode: truncated or corrupt data fails here, not later
            if too_big:
                img = img.resize(target, Image.BILINEAR) if img.size != target else img
                warnings.warn(
                    f"{path}: {original[0]}x{original[1]} image is above {max_pixels} pixels; "
                    f"downscaled to {target[0]}x{target[1]}",
                    DataWarning,
                    stacklevel=2,
                )
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except Exception as exc:  # Pillow raises many types for malformed data
        raise DataError(f"{path}: cannot decode image ({_describe(exc)})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (see ``load_image``)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    if mode in _ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        gray = array_to_uint8(np.asarray(img))
        return Image.fromarray(gray).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are the sensible ones.
    return img.convert("RGB")


def array_to_uint8(values: np.ndarray) -> np.ndarray:
    """Bring an integer or float pixel array to uint8 by scaling its value range, never clipping.

    uint8 passes through; other integers are scaled by the 16-bit range (values above 65535 or
    below 0 are min-max scaled instead); floats in [0, 1] by 255, other floats min-max.
    """
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    lo, hi = float(values.min()), float(values.max())
    if values.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        scaled = values.astype(np.float64) * (255.0 / 65535.0)
    elif values.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        scaled = values.astype(np.float64) * 255.0
    elif hi > lo:
        scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros(values.shape)
    return np.rint(scaled).astype(np.uint8)


def load_label(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label file and return its raw values (uint8, uint16 or int32).

    Palette PNGs are read as palette indices (VOC convention), never as colours.
    """
    path = Path(path)
    _check_nonempty(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in _LABEL_MODES:
                raise DataError(
                    f"{path}: a label file must have one channel of class indices "
                    f"(8- or 16-bit grayscale or palette PNG), got image mode {mode!r}"
                )
            array = np.array(img)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types for malformed data
        raise DataError(f"{path}: cannot decode label file ({_describe(exc)})") from exc
    if mode == "1":
        return array.astype(np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return array.astype(np.uint16)  # byte order normalised to native
    return array


def _check_nonempty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot access file ({_describe(exc)})") from exc
    if path.is_dir():
        raise DataError(f"{path}: expected an image file, found a folder")
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
