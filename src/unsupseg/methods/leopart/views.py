"""Leopart's multi-crop views (docs/methods/leopart.md §1.2): crop boxes with overlap constraints, the
reference's photometric augmentation, and the boxes where each pair of crops overlaps."""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch import Tensor

from .params import FinetuneParams


def sample_rrc_box(width: int, height: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] of torchvision's RandomResizedCrop sampler (10 tries, then a central crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _intersection(a, b) -> float:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


_MAX_TRIES = 1000   # Ref retries forever; a pathological image gets its last draw instead of hanging


def sample_crop_boxes(
    width: int, height: int, p: FinetuneParams, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """G global then L local boxes: every further global crop overlaps each earlier one, and every
    local crop each global one, by more than the integer-truncated share of the image area."""
    global_min = int(p.global_overlap * width * height)
    local_min = int(p.local_overlap * width * height)
    boxes = []
    for _ in range(p.num_global):
        for _ in range(_MAX_TRIES):
            box = sample_rrc_box(width, height, p.global_scale, p.ratio, rng)
            if all(_intersection(box, other) > global_min for other in boxes):
                break
        boxes.append(box)
    for _ in range(p.num_local):
        for _ in range(_MAX_TRIES):
            box = sample_rrc_box(width, height, p.local_scale, p.ratio, rng)
            if all(_intersection(box, boxes[g]) > local_min for g in range(p.num_global)):
                break
        boxes.append(box)
    return boxes


def overlap_boxes(boxes, sizes, num_global: int) -> tuple[Tensor, Tensor]:
    """(gc [G, V, 4], all [V, G, 4]): the intersection of global crop g and crop v, in g's resized
    frame (gc) and in v's (all); an empty intersection gives an all-zero box."""
    boxes = torch.tensor(boxes, dtype=torch.float64)
    v_count = len(boxes)
    gc = torch.zeros(num_global, v_count, 4, dtype=torch.float64)
    al = torch.zeros(v_count, num_global, 4, dtype=torch.float64)

    def frame(inter, box, size):
        scale = torch.tensor([size / (box[2] - box[0]), size / (box[3] - box[1])] * 2, dtype=torch.float64)
        return (inter - box[[0, 1, 0, 1]]) * scale

    for g in range(num_global):
        for v in range(v_count):
            inter = torch.cat([torch.maximum(boxes[g, :2], boxes[v, :2]), torch.minimum(boxes[g, 2:], boxes[v, 2:])])
            if inter[2] <= inter[0] or inter[3] <= inter[1]:
                continue
            gc[g, v] = frame(inter, boxes[g], sizes[g])
            al[v, g] = frame(inter, boxes[v], sizes[v])
    return gc.float(), al.float()


def color_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """ColorJitter(0.8, 0.8, 0.8, 0.2) w.p. 0.8, grayscale w.p. 0.2, PIL Gaussian blur
    (radius 0.1-2.0) w.p. 0.5: the reference's per-crop photometric pipeline."""
    if rng.random() < 0.8:
        factors = [rng.uniform(0.2, 1.8), rng.uniform(0.2, 1.8), rng.uniform(0.2, 1.8), rng.uniform(-0.2, 0.2)]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in rng.permutation(4):
            image = ops[i](image, factors[i])
    if rng.random() < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return image


def make_views(image: Image.Image, p: FinetuneParams, rng: np.random.Generator) -> dict[str, Tensor]:
    """The crops of one image ([0, 1] tensors; the ViT normalises) and their overlap boxes."""
    sizes = [p.global_size] * p.num_global + [p.local_size] * p.num_local
    boxes = sample_crop_boxes(image.width, image.height, p, rng)
    crops = []
    for box, size in zip(boxes, sizes):
        crop = image.crop(box).resize((size, size), Image.Resampling.BILINEAR)
        crops.append(TF.pil_to_tensor(color_augment(crop, rng)).float().div_(255))
    gc, al = overlap_boxes(boxes, sizes, p.num_global)
    out = {"globals": torch.stack(crops[: p.num_global]), "gc": gc, "all": al}
    out["locals"] = torch.stack(crops[p.num_global :]) if p.num_local else torch.zeros(0, 3, p.local_size, p.local_size)
    return out


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """globals [G, B, 3, S, S], locals [L, B, 3, s, s], gc [B, G, V, 4], all [B, V, G, 4]."""
    return {
        "globals": torch.stack([it["globals"] for it in items], 1),
        "locals": torch.stack([it["locals"] for it in items], 1),
        "gc": torch.stack([it["gc"] for it in items]),
        "all": torch.stack([it["all"] for it in items]),
    }
