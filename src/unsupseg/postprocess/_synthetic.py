"""Plausible synthetic predictions for testing and benchmarking the CRF (not part of the API).

``noisy_label_log_probs`` turns a ground-truth label map into the kind of prediction a
patch-based segmenter produces: coarse (1/8 resolution, like a ViT-S/8 feature map), blurry at
object boundaries after bilinear upsampling, and noisy. The recipe, used by the tests and by
``benchmarks/bench_crf.py``:

1. one-hot of the labels (ignored pixels, ``label >= num_classes`` or ``< 0``, are all-zero);
2. average-pool to ``1 / downsample`` of the resolution (``area`` interpolation);
3. add i.i.d. Gaussian noise of std ``noise`` (seeded);
4. multiply by ``scale`` (3), upsample bilinearly (``align_corners=False``) to full resolution;
5. ``log_softmax`` over the classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def noisy_label_log_probs(
    label: np.ndarray,
    num_classes: int,
    *,
    downsample: int = 8,
    noise: float = 0.5,
    scale: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """C x H x W float32 log-probabilities made from an H x W integer label map (see module doc)."""
    lbl = torch.as_tensor(np.asarray(label), dtype=torch.int64)
    H, W = lbl.shape
    valid = (lbl >= 0) & (lbl < num_classes)
    onehot = F.one_hot(torch.where(valid, lbl, 0), num_classes).permute(2, 0, 1).float()
    onehot = onehot * valid[None].float()
    h, w = max(1, H // downsample), max(1, W // downsample)
    small = F.interpolate(onehot[None], size=(h, w), mode="area")
    gen = torch.Generator().manual_seed(seed)
    small = small + noise * torch.randn(small.shape, generator=gen)
    up = F.interpolate(scale * small, size=(H, W), mode="bilinear", align_corners=False)
    return torch.log_softmax(up[0], dim=0).numpy()
