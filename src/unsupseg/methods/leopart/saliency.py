"""Noisy foreground masks: Leopart's attention procedure (spec §1.4) and a label-free cue for CNNs.

``mass_foreground`` is the reference's routine on any non-negative saliency map: Gaussian blur
(kernel 7, sigma 0.6), keep the highest tokens that hold ``mass`` of the blurred total, then drop
8-connected components of at most two tokens. ViTs feed it their head-averaged CLS attention.

CNN backbones have no CLS attention. ``distinctiveness`` is the global-contrast cue of classic
saliency detection (a region is salient when it differs from the rest of its image): one minus the
cosine between a token and its image's mean feature. Large uniform regions (road, sky, walls)
dominate the mean and score low; objects that stand out score high. It needs no training, no
labels and no centre assumption (street scenes put their objects anywhere).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor


def gaussian_blur(maps: Tensor, kernel: int = 7, sigma: float = 0.6) -> Tensor:
    """B x h x w maps blurred like torchvision's gaussian_blur (same kernel, reflect padding; edge
    replication where a side is too short to reflect)."""
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, kernel, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    pad = kernel // 2
    h, w = maps.shape[-2:]
    mode = "reflect" if min(h, w) > pad else "replicate"
    out = F.pad(maps[:, None].float(), (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(out, k1.view(1, 1, 1, kernel))
    out = F.conv2d(out, k1.view(1, 1, kernel, 1))
    return out[:, 0]


def remove_small_components(mask: np.ndarray, max_size: int = 2) -> np.ndarray:
    """``mask`` (h x w bool) without its 8-connected components of at most ``max_size`` pixels."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_size
    small[0] = False
    return mask & ~small[labels]


def mass_foreground(
    saliency: Tensor, mass: float, kernel: int = 7, sigma: float = 0.6, max_component: int = 2
) -> Tensor:
    """Foreground (B x h x w bool) of B x h x w non-negative saliency maps, spec §1.4."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"saliency mass must be in (0, 1], got {mass}")
    blurred = gaussian_blur(saliency, kernel, sigma).clamp_min(0)
    b, h, w = blurred.shape
    flat = blurred.reshape(b, -1)
    values, order = flat.sort(dim=1)
    cum = torch.cumsum(values / values.sum(1, keepdim=True).clamp_min(1e-12), dim=1)
    keep_sorted = cum > 1 - mass
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted).reshape(b, h, w)
    cleaned = [remove_small_components(m, max_component) for m in keep.cpu().numpy()]
    return torch.from_numpy(np.stack(cleaned)).to(saliency.device)


def distinctiveness(features: Tensor) -> Tensor:
    """B x D x h x w features -> B x h x w: 1 - cos(token, mean token of its image), in [0, 2]."""
    tokens = F.normalize(features.float(), dim=1)
    mean = F.normalize(tokens.mean((2, 3), keepdim=True), dim=1)
    return (1 - (tokens * mean).sum(1)).clamp_min(0)

