"""The ``Segmenter``: a run's backbone, method predictor and test-time recipe; ``load`` rebuilds one."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import labels as labels_file
from .. import rundir
from ..backbones import build_backbone
from ..config import (
    RunConfig,
)
from ..data import Preprocess, load_image
from ..data.images import DEFAULT_MAX_PIXELS, DataWarning, to_rgb
from ..data.transforms import LONG_SIDE_FACTOR
from ..engine import autocast, init_distributed, resolve_precision
from ..errors import ConfigError, RunDirError
from ..methods.base import Method, Predictor, PredictorInfo
from .resolve import resolve_method

# what one photo (or its batch) may raise in preprocessing or the forward pass: it is skipped, not fatal
PREDICT_ERRORS = (RuntimeError, ValueError, MemoryError)


def check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive number of pixels (or None: no limit), got {max_pixels!r}")





@dataclass
class Prediction:
    labels: np.ndarray            # H x W int64 cluster ids (B x H x W from predict_tensors)
    probabilities: torch.Tensor | None   # C x H x W (after the CRF when enabled); None when not asked for


class Segmenter:
    """Backbone + method predictor + test-time recipe (resolution, flip, tiling, CRF).

    ``precision`` (auto | bf16 | fp32, default the run's ``precision``): the backbone and head run in
    bf16 autocast when it resolves to bf16 (auto: on a CUDA device); the CRF and the softmax before
    it always run in float32. ``method`` and ``params``: the run's method and typed Params (``resolved``:
    that pair when the caller holds it already).
    """

    def __init__(
        self,
        config: RunConfig,
        backbone,
        predictor: Predictor,
        device: torch.device,
        path: Path | None = None,
        precision: str | None = None,
        resolved: tuple[Method, Any] | None = None,
    ):
        self.config = config
        self.method, self.params = resolved or resolve_method(config)
        self.backbone = backbone
        self.predictor = predictor.to(device).eval()
        self.device = device
        self.path = path
        self.precision = resolve_precision(precision or config.precision, device)

    @classmethod
    def from_run(cls, run: rundir.Run, *, backbone=None, device: str | None = None, precision: str | None = None,
                 resolved: tuple[Method, Any] | None = None) -> "Segmenter":
        config = run.config
        method, params = resolved or resolve_method(config)
        dev = init_distributed(device or config.device).device
        if backbone is None:
            backbone = build_backbone(
                config.backbone.name, config.backbone.weights, device=dev, **config.backbone.options
            )
        if backbone.weights_id != run.meta.get("backbone_weights_id"):
            warnings.warn(
                f"backbone weights differ from those the run in {run.path} was trained with "
                f"({backbone.weights_id} vs {run.meta.get('backbone_weights_id')})",
                stacklevel=2,
            )
        info = PredictorInfo(num_clusters=config.clusters, feature_dim=backbone.dim, stride=backbone.stride)
        try:
            predictor = method.build_predictor(params, run.state, info)
        except KeyError as err:
            raise RunDirError(
                f"{run.path / rundir.WEIGHTS} does not hold a {config.method} model (no {err} tensor): "
                "the weights belong to another method or run"
            ) from None
        return cls(config, backbone, predictor, dev, run.path, precision, (method, params))

    @property
    def num_clusters(self) -> int:
        return self.config.clusters

    @property
    def batch_size(self) -> int:
        """Photos per forward pass unless told: the run's ``batch_size`` on a GPU, 1 on CPU. Batched
        kernels round the last bits differently from single ones, which flips a few pixels at near
        ties; on CPU batching gains little, so CPU results stay exactly those of one at a time."""
        return self.config.batch_size if self.device.type == "cuda" else 1

    @property
    def resolution(self) -> int:
        return self.config.test.resolution or self.config.data.resolution

    def preprocess(self) -> Preprocess:
        return Preprocess(self.resolution, mode="short", interpolation="bilinear")

    def eval_preprocess(self, data) -> Preprocess:
        """The benchmark transform of ``data`` at this run's test resolution and image interpolation."""
        return data.eval_preprocess(
            self.resolution, multiple=self.backbone.stride, interpolation=self.config.test.interpolation
        )

    # -- the test-time path, on features
    def _embed(self, features: torch.Tensor) -> torch.Tensor:
        grid = self.predictor.fixed_grid
        if grid is None or tuple(features.shape[-2:]) == tuple(grid):
            return self.predictor.embed(features)
        if not self.config.test.tile:
            raise ConfigError(f"this head needs a {grid[0]}x{grid[1]} token grid, got {tuple(features.shape[-2:])}")
        return tiled_embed(self.predictor.embed, features, grid)

    @torch.no_grad()
    def scores(self, features: torch.Tensor, flipped: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """B x C x H x W float32 scores from B x D x h x w features (and those of the flipped images)."""
        with autocast(self.device, self.precision):
            emb = self._embed(features.to(self.device).float())
            if flipped is not None:
                emb = (emb + self._embed(flipped.to(self.device).float()).flip(-1)) / 2
            if self.predictor.upsample_scores:
                out = F.interpolate(self.predictor.classify(emb), size=size, mode="bilinear", align_corners=False)
            else:
                out = self.predictor.classify(F.interpolate(emb, size=size, mode="bilinear", align_corners=False))
        return out.float()

    def _finish(self, scores: torch.Tensor, images: torch.Tensor | None, crf: bool) -> torch.Tensor:
        """Probabilities B x C x H x W: softmax(alpha * scores), refined by the CRF when asked."""
        logp = torch.log_softmax(self.config.test.alpha * scores.float(), dim=1)
        if not crf:
            return logp.exp()
        from ..postprocess.crf import refine_batch

        rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return refine_batch(rgb.to(logp.device), logp)

    @torch.no_grad()
    def predict_tensors(
        self, images: torch.Tensor, *, crf: bool | None = None, probabilities: bool = True
    ) -> Prediction:
        """Predictions for a batch of same-sized preprocessed images (B x 3 x H x W float in [0, 1]):
        labels B x H x W, probabilities B x C x H x W (None unless ``probabilities``: they are C times
        the labels' size to copy off the device). Each image's are those it gets alone."""
        crf = self.config.test.crf if crf is None else crf
        h, w = images.shape[-2:]
        s = self.backbone.stride
        # pad (edge replication) up to a multiple of the stride, so every pixel is predicted
        batch = F.pad(images.to(self.device), (0, -w % s, 0, -h % s), mode="replicate")
        with autocast(self.device, self.precision):
            feats = self.backbone(batch)
            flipped = self.backbone(batch.flip(-1)) if self.config.test.flip else None
        scores = self.scores(feats, flipped, tuple(batch.shape[-2:]))[:, :, :h, :w]
        probs = self._finish(scores, batch[:, :, :h, :w], crf)
        return Prediction(probs.argmax(1).cpu().numpy(), probs.cpu() if probabilities else None)

    def predict_tensor(self, image: torch.Tensor, *, crf: bool | None = None) -> Prediction:
        """Prediction for one preprocessed image (3 x H x W float in [0, 1])."""
        pred = self.predict_tensors(image[None], crf=crf)
        return Prediction(pred.labels[0], pred.probabilities[0])

    def predict(self, image, *, crf: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Cluster id per pixel (H x W) for a photo (path or PIL image) at its displayed size.

        A file above ``max_pixels`` is downscaled on load (with a warning) and labelled at that size.
        A PIL image is converted as a file is read (transparency composited onto white).
        """
        check_max_pixels(max_pixels)
        return self.predict_batch([image], crf=crf, max_pixels=max_pixels)[0]

    def predict_batch(self, images: Sequence, *, crf: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      batch_size: int | None = None) -> list[np.ndarray]:
        """``predict`` of several photos (paths or PIL images), in their order; photos of the same
        preprocessed size go through the backbone and the head together (see ``predict_stream``).
        A PIL image is converted as a file is read (transparency composited onto white)."""
        check_max_pixels(max_pixels)
        pils = [to_rgb(im) if isinstance(im, Image.Image) else load_image(im, max_pixels=max_pixels) for im in images]
        names = [f"image {i}" if isinstance(im, Image.Image) else str(im) for i, im in enumerate(images)]
        labels = {i: lab for i, _, lab in self.predict_stream(enumerate(pils), crf=crf, batch_size=batch_size,
                                                                    name=names.__getitem__)}
        return [labels[i] for i in range(len(pils))]

    def predict_stream(self, items: Iterable[tuple[object, Image.Image]], *, crf: bool | None = None,
                       batch_size: int | None = None, name: Callable[[object], str] = str,
                       on_error: Callable[[object, Exception], None] | None = None, confidence: bool = False,
                       ) -> Iterator[tuple]:
        """``(key, photo, labels at the photo's size)`` for each ``(key, PIL photo)`` of ``items``.

        Photos are grouped by preprocessed size and run ``batch_size`` (default: ``self.batch_size``)
        to a forward pass. At most ``batch_size`` photos are held: when that many
        wait, the largest same-size group runs, so results come out of input order. Memory stays
        bounded by the batch size, whatever the number of photos. ``name(key)`` names a photo in
        warnings. With ``on_error``, a photo that cannot be preprocessed or predicted (and
        the rest of its batch) is reported to it by key and the stream goes on. With ``confidence``,
        each tuple ends with the maximum probability per pixel (float32, the photo's size) too.
        """
        size = batch_size or self.batch_size
        if size < 1:
            raise ConfigError(f"batch size must be at least 1, got {size}")
        groups: dict[tuple[int, ...], list[tuple[object, Image.Image, torch.Tensor]]] = {}

        def run(shape):
            group = groups.pop(shape)
            try:
                pred = self.predict_tensors(torch.stack([t for _, _, t in group]), crf=crf, probabilities=confidence)
            except PREDICT_ERRORS as err:
                if on_error is None:
                    raise
                for key, _, _ in group:
                    on_error(key, err)
                return
            for i, (key, pil, _) in enumerate(group):
                if confidence:
                    top = pred.probabilities[i].max(0).values.numpy()
                    yield key, pil, self._displayed(pred.labels[i], pil), self._displayed_confidence(top, pil)
                else:
                    yield key, pil, self._displayed(pred.labels[i], pil)

        waiting = 0
        for key, image in items:
            pil = to_rgb(image)
            try:
                tensor = self.model_input(pil, name(key))
            except PREDICT_ERRORS as err:
                if on_error is None:
                    raise
                on_error(key, err)
                continue
            groups.setdefault(tuple(tensor.shape), []).append((key, pil, tensor))
            waiting += 1
            if waiting == size:
                largest = max(groups, key=lambda shape: len(groups[shape]))   # the oldest among equals
                waiting -= len(groups[largest])
                yield from run(largest)
        for shape in list(groups):
            yield from run(shape)

    def model_input(self, pil: Image.Image, name: str = "image") -> torch.Tensor:
        """The preprocessed tensor of an RGB photo: shorter side at the test resolution, the longer side
        capped at LONG_SIDE_FACTOR times it (see ``Preprocess``), with a warning naming ``name``."""
        prep = self.preprocess()
        if prep.long_side_capped(pil.height, pil.width):
            new_h, new_w = prep.resized_size(pil.height, pil.width)
            warnings.warn(
                f"{name}: {pil.width}x{pil.height} is a very elongated image; segmented at {new_w}x{new_h} "
                f"(longer side capped at {LONG_SIDE_FACTOR * self.resolution} px)",
                DataWarning,
                stacklevel=3,
            )
        return prep.apply(pil)[0]

    def _displayed(self, labels: np.ndarray, pil: Image.Image) -> np.ndarray:
        """Labels resized (nearest) from the preprocessed size to the photo's."""
        if labels.shape == (pil.height, pil.width):
            return labels
        return np.asarray(
            Image.fromarray(labels.astype(np.uint8 if self.num_clusters <= 256 else np.int32)).resize(
                (pil.width, pil.height), Image.NEAREST
            )
        )

    def _displayed_confidence(self, top: np.ndarray, pil: Image.Image) -> np.ndarray:
        """Per-pixel confidence resized (bilinear) from the preprocessed size to the photo's."""
        if top.shape == (pil.height, pil.width):
            return top
        resized = Image.fromarray(top.astype(np.float32), mode="F").resize((pil.width, pil.height), Image.BILINEAR)
        return np.asarray(resized)


def tiled_embed(
    embed: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Run a fixed-grid head over overlapping windows (stride half a window) covering the whole map,
    averaging overlaps; maps smaller than the window are padded by edge replication and cropped back."""
    gh, gw = grid
    _, _, h, w = features.shape
    ph, pw = max(gh - h, 0), max(gw - w, 0)
    padded = F.pad(features, (0, pw, 0, ph), mode="replicate") if ph or pw else features
    H, W = padded.shape[-2:]

    def starts(size, win):
        step = max(win // 2, 1)
        pos = list(range(0, size - win + 1, step))
        if pos[-1] != size - win:
            pos.append(size - win)
        return pos

    out = count = None
    for y in starts(H, gh):
        for x in starts(W, gw):
            emb = embed(padded[:, :, y : y + gh, x : x + gw])
            if out is None:
                out = torch.zeros(emb.shape[0], emb.shape[1], H, W, device=emb.device)
                count = torch.zeros(1, 1, H, W, device=emb.device)
            out[:, :, y : y + gh, x : x + gw] += emb
            count[:, :, y : y + gh, x : x + gw] += 1
    return (out / count)[:, :, :h, :w]


def load(run: str | os.PathLike, *, device: str | None = None, precision: str | None = None) -> Segmenter:
    """Rebuild the Segmenter of a finished run directory (``precision``: auto | bf16 | fp32, default the run's)."""
    return Segmenter.from_run(rundir.load(run), device=device, precision=precision)


def run_labels(seg: Segmenter) -> labels_file.Labels:
    """The names and merges of ``seg``'s run (identity labels for a segmenter without a run directory)."""
    if seg.path is None:
        return labels_file.identity(seg.num_clusters)
    return labels_file.load(seg.path, seg.num_clusters)


def fit_record(seg: Segmenter) -> dict[str, str]:
    """What the method recorded about its fit (meta.json "fit_record"; empty for runs in memory or
    written before it was recorded)."""
    if seg.path is None or not (Path(seg.path) / rundir.META).is_file():
        return {}
    return json.loads((Path(seg.path) / rundir.META).read_text()).get("fit_record", {})
