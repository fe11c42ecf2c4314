"""Colour palettes and overlays for label maps."""

from __future__ import annotations

import numpy as np
from PIL import Image


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (the PASCAL VOC bit-interleaving scheme, extended past 256 by cycling)."""
    colours = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(len(colours)):
        label, r, g, b = i % 256, 0, 0, 0
        for bit in range(8):
            r |= ((label >> 0) & 1) << (7 - bit)
            g |= ((label >> 1) & 1) << (7 - bit)
            b |= ((label >> 2) & 1) << (7 - bit)
            label >>= 3
        colours[i] = (r, g, b)
    colours[0] = (128, 64, 128) if n > 1 else colours[0]   # cluster 0 visible instead of black
    return colours[:n]


def colorize(labels: np.ndarray, num_labels: int) -> np.ndarray:
    return palette(num_labels)[np.clip(labels, 0, num_labels - 1)]


def overlay(image: Image.Image, labels: np.ndarray, num_labels: int, opacity: float = 0.5) -> Image.Image:
    """The photo with each pixel's cluster colour blended over it (label map at the photo's size)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = colorize(labels, num_labels).astype(np.float32)
    return Image.fromarray((rgb * (1 - opacity) + colours * opacity).round().astype(np.uint8))
