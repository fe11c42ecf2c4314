"""The Python face of unsupseg: ``fit``, ``load``, ``Segmenter.predict``, ``evaluate``, ``segment``.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__, rundir
from ._io import atomic_path, atomic_write_text, check_writable_dir, check_writable_file, remove_stale_temporaries
from ._progress import console, track
from .backbones import build_backbone
from .config import (
    RunConfig,
    apply_overrides,
    check_clusters,
    from_dict,
    has_preset,
    load_preset,
    merge,
    to_dict,
)
from .data import CroppedDataset, CropView, ImageFolder, Preprocess, build_dataset, load_image
from .data.images import DEFAULT_MAX_PIXELS, DataWarning, to_rgb
from .engine import autocast, init_distributed, resolve_precision
from .errors import ConfigError, DataError, OutputError, RunDirError
from .evaluation.metrics import PROTOCOLS, ConfusionMatrix, PerImageHungarian, leopart_score, score
from .evaluation.visualize import overlay
from .features.extract import extract_features
from .features.source import open_features
from .methods import get_method
from .methods.base import FitContext, LinearProbe, Predictor, PredictorInfo

__all__ = ["Segmenter", "evaluate", "fit", "fit_config", "load", "plan", "resolve_config", "segment", "segment_image"]

# A photo's longer side is processed at most this many times the test resolution (see model_input).
LONG_SIDE_FACTOR = 8
# what one photo (or its batch) may raise in preprocessing or the forward pass: it is skipped, not fatal
PREDICT_ERRORS = (RuntimeError, ValueError, MemoryError)


# ----------------------------------------------------------------------------- configuration


def resolve_config(
    method: str | None = None,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    **fields,
) -> RunConfig:
    """Defaults <- preset <- config file <- keyword fields <- ``--set`` overrides.

    ``fields`` are dotted names (``backbone.name``, ``data.dataset``, ``clusters`` ...) whose None
    values are ignored. When no preset is named, the method's preset for the dataset is used if one
    ships with the package (``presets/<method>/<dataset>.yaml``), else ``presets/<method>/default.yaml``.
    """
    data: dict = {}
    if config_file is not None:
        from .config import load_yaml

        data = load_yaml(config_file)
    method = method or data.get("method") or "kmeans"
    get_method(method)
    dataset = fields.get("data.dataset") or data.get("data", {}).get("dataset")
    if preset is None:
        if dataset and has_preset(method, dataset):
            preset = dataset
        elif has_preset(method, "default"):
            preset = "default"
    base = load_preset(method, preset) if preset else {}
    merged = merge(merge(base, data), {"method": method})
    explicit = [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    merged = apply_overrides(merged, explicit + list(overrides))
    config = from_dict(RunConfig, merged)
    check_clusters(config.clusters, min_clusters(method))
    # the method's own dataclass checks the params section (unknown keys name the closest one)
    params = from_dict(get_method(method).Params, config.params, "params")
    config.params = to_dict(params)
    _check_auto_clusters(config)
    return config


def min_clusters(method: str) -> int:
    return getattr(get_method(method), "MIN_CLUSTERS", 1)


def _absolute_paths(config: RunConfig) -> None:
    """Store the run's paths absolute, so that the run works from any folder (``report``, ``fit
    --config RUN/config.yaml``); ``--images`` etc. still override them."""
    def absolute(value: str | None) -> str | None:
        return None if value is None else os.path.abspath(os.path.expanduser(value))

    d = config.data
    d.images, d.root, d.crops = absolute(d.images), absolute(d.root), absolute(d.crops)
    config.cache_dir = absolute(config.cache_dir)
    if config.backbone.weights not in ("auto", "random"):
        config.backbone.weights = absolute(config.backbone.weights)


def _check_cache_dir(config: RunConfig) -> None:
    from .features.cache import default_cache_dir

    where = "feature cache folder" + ("" if config.cache_dir else " (UNSUPSEG_CACHE_DIR or ~/.cache/unsupseg/features)")
    check_writable_dir(config.cache_dir or default_cache_dir(), where)


AUTO = "auto"


def _check_auto_clusters(config: RunConfig) -> None:
    """``clusters_range``, the search range of ``clusters: auto`` (the config type admits no other text)."""
    r = config.clusters_range
    if len(r) != 2 or not 1 <= r[0] <= r[1]:
        raise ConfigError(f"clusters_range must be two integers LOW,HIGH with 1 <= LOW <= HIGH, got {r}")


def choose_clusters(config: RunConfig, store, log: Callable[[str], None]):
    """Estimate the number of categories of the training features (``clusters: auto``); see
    ``unsupseg.features.cluster_count``. Returns the ClusterCount (chosen K and the curve)."""
    from .features.cluster_count import estimate_clusters

    low, high = config.clusters_range
    prototypes = max(100, high + 1)   # the partitions searched are unions of prototypes
    tic = time.perf_counter()
    try:
        # its own random stream (seed * 1000 + 900), apart from the methods' FitContext.generator offsets
        result = estimate_clusters(store, (low, high), torch.Generator().manual_seed(config.seed * 1000 + 900),
                                   prototypes=prototypes)
    except ValueError as err:
        raise ConfigError(f"clusters auto: {err}") from None
    log(f"clusters auto: K = {result.chosen} (modularity {max(result.scores):.3f}, searched {low}..{high}, "
        f"{result.images} images, {result.tokens} tokens, {time.perf_counter() - tic:.1f} s)")
    return result


def _method_params(config: RunConfig):
    return from_dict(get_method(config.method).Params, config.params, "params")


def build_train_dataset(config: RunConfig):
    """The training items: the images (or benchmark split, or prepared crop folder), cut into
    ``data.crop`` crops on the fly when asked."""
    d = config.data
    if d.crops:
        if d.crop != "none":
            raise ConfigError(
                f"data.crops={d.crops!r} is a folder of prepared crops, and data.crop={d.crop!r} would crop them "
                "again: set data.crop=none to train on the folder, or drop data.crops to cut the crops on the fly"
            )
        return CroppedDataset(d.crops)
    if d.images:
        data = ImageFolder(d.images, strict=d.strict)
    elif d.dataset:
        if not d.root:
            raise ConfigError(f"dataset {d.dataset!r} needs --root (the folder that holds it)")
        data = build_dataset(d.dataset, d.root, d.split)
    else:
        raise ConfigError("nothing to train on: give --images DIR, or --dataset NAME --root DIR --split S")
    return CropView(data, d.crop) if d.crop != "none" else data


def _train_preprocess(config: RunConfig, stride: int, resolution: int | None = None) -> Preprocess:
    d = config.data
    return Preprocess(resolution or d.resolution, mode=d.mode, interpolation=d.interpolation, multiple=stride)


# ----------------------------------------------------------------------------- fit


def fit_config(
    method: str | None = None,
    *,
    backbone: str | None = None,
    backbone_weights: str | None = None,
    images: str | os.PathLike | None = None,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str | None = None,
    clusters: int | str | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """The resolved config of a ``fit`` call with these arguments."""
    return resolve_config(
        method,
        preset=preset,
        config_file=config_file,
        overrides=overrides,
        **{
            "backbone.name": backbone,
            "backbone.weights": backbone_weights,
            "data.images": str(images) if images is not None else None,
            "data.dataset": dataset,
            "data.root": str(root) if root is not None else None,
            "data.split": split,
            "clusters": clusters,
        },
    )


def fit(
    method: str | None = None,
    *,
    out: str | os.PathLike,
    backbone: str | None = None,
    backbone_weights: str | None = None,
    images: str | os.PathLike | None = None,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str | None = None,
    clusters: int | str | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> "Segmenter":
    """Fit ``method`` and write a run directory at ``out``; returns its Segmenter.

    ``method`` None: the config file's method, else kmeans. ``clusters="auto"`` estimates K from the
    training features first (``choose_clusters``); the run's config.yaml then holds the chosen K and
    meta.json the criterion's curve (``clusters_auto``). An interrupted fit with the same
    configuration resumes from its last checkpoint; a fit that fails before its first checkpoint
    leaves nothing behind.
    """
    log = log or (lambda msg: console.print(msg))
    config = fit_config(method, backbone=backbone, backbone_weights=backbone_weights, images=images, dataset=dataset,
                        root=root, split=split, clusters=clusters, preset=preset, config_file=config_file,
                        overrides=overrides)
    _absolute_paths(config)
    dist = init_distributed(config.device, config.precision)
    out = Path(out)
    created = not out.exists()
    if dist.is_main and config.data.cache != "never":   # never: not a byte, not a folder in the cache
        _check_cache_dir(config)
    resuming = rundir.prepare(out, config, overwrite) if dist.is_main else False
    dist.barrier()
    if resuming:
        log(f"resuming the unfinished run in {out}")
    if dist.precision == "bf16":
        log(f"training steps in bf16 autocast on {dist.device} (float32 weights); --set precision=fp32 turns it off")
    try:
        return _fit(config, out, dist, log)
    except BaseException:
        if dist.is_main:
            rundir.abandon(out, created)
        raise


def _fit(config: RunConfig, out: Path, dist, log: Callable[[str], None]) -> "Segmenter":
    torch.manual_seed(config.seed)
    train_data = build_train_dataset(config)
    net = build_backbone(config.backbone.name, config.backbone.weights, device=dist.device, **config.backbone.options)
    cache_dir = config.cache_dir

    def features(resolution: int | None = None, flip: bool = False):
        prep = _train_preprocess(config, net.stride, resolution)
        source, reason = open_features(
            net, train_data, prep, cache=config.data.cache, cache_dir=cache_dir, max_gb=config.data.cache_max_gb,
            batch_size=config.batch_size, flip=flip, strict=config.data.strict, workers=config.data.workers,
            dist=dist, log=log, warn=lambda msg: warnings.warn(msg, stacklevel=2),
            description=f"features {prep.resolution}px",
        )
        log(f"training features at {prep.resolution}px, {len(source)} items: {reason}")
        check_clusters(config.clusters, tokens=sum(shape[1] * shape[2] for shape in source.shapes))
        return source

    auto = None
    if config.clusters == AUTO:
        # config.yaml keeps "auto" until the fit ends, so that an interrupted fit resumes
        auto = choose_clusters(config, features(), log)
        config.clusters = auto.chosen
    module = get_method(config.method)
    ctx = FitContext(
        config=config,
        params=_method_params(config),
        backbone=net,
        features=features,
        dataset=train_data,
        num_classes=getattr(train_data, "num_classes", None),
        dist=dist,
        checkpoint_dir=out / rundir.CHECKPOINTS,
        log=log,
    )
    tic = time.perf_counter()
    state = module.fit(ctx)
    elapsed = time.perf_counter() - tic
    if dist.is_main:
        rundir.save(
            out,
            config,
            state,
            {
                "backbone": net.name,
                "backbone_weights_id": net.weights_id,
                "train_data": {"name": getattr(train_data, "name", None), "images": len(train_data),
                               "fingerprint": train_data.fingerprint()},
                "fit_seconds": round(elapsed, 1),
                **({"clusters_auto": auto.to_dict()} if auto is not None else {}),
            },
        )
        log(f"fit finished in {elapsed:.1f} s; run written to {out}")
    dist.barrier()
    return Segmenter.from_run(rundir.load(out), backbone=net)


def plan(config: RunConfig, cache_dir: str | os.PathLike | None = None, throughput: float | None = None) -> list[str]:
    """What ``fit`` with ``config`` would do, as lines of text; builds no backbone (no weights needed),
    extracts nothing and writes nothing. ``throughput`` (training items per second, e.g. measured by
    benchmarks/bench_paper_scale.py or gpu_check.sh on the target machine) gives a time estimate."""
    from .backbones import get_spec
    from .features.cache import default_cache_dir
    from .features.pipeline import resolve_workers
    from .features.source import choose_source, estimate_size, gb, has_labels, token_shapes

    spec = get_spec(config.backbone.name)
    train_data = build_train_dataset(config)
    n = len(train_data)
    base = getattr(train_data, "source", train_data)
    crops = f"{len(base):,} images x {train_data.per_image} {config.data.crop} crops" if isinstance(train_data, CropView) else f"{n:,} images"
    module = get_method(config.method)
    params = _method_params(config)
    labelled = has_labels(train_data)
    folder = Path(cache_dir or config.cache_dir or default_cache_dir())
    lines = [
        f"fit {config.method} on {getattr(train_data, 'name', '?')}: {n:,} training items ({crops})",
        f"backbone {spec.name}: {spec.dim} channels, stride {spec.stride}; batch of {config.batch_size} per forward; "
        f"{resolve_workers(config.data.workers)} decode workers",
    ]
    fplan = module.plan(params, config.method, config.clusters, n, spec.dim, 0)
    tokens = 0
    for resolution in dict.fromkeys(r or config.data.resolution for r in fplan.resolutions):
        shapes = token_shapes(train_data, _train_preprocess(config, spec.stride, resolution), spec.stride, spec.dim)
        tokens = max(tokens, sum(h * w for _, h, w in shapes))
        estimate = estimate_size(shapes, spec.stride, labelled)
        verdict, reason = choose_source(config.data.cache, estimate, config.data.cache_max_gb, folder)
        lines.append(f"features at {resolution}px: {estimate.describe()}")
        # the entry's key hashes the loaded weights, which a plan never reads: it cannot tell a hit
        caveat = "" if config.data.cache == "never" else {
            "stream": " (unless this entry is already cached)",
            "cache": " (a hit instead, backbone skipped, if this entry is already cached)"}[verdict]
        lines.append(f"  source: {'stream (backbone on every batch)' if verdict == 'stream' else 'cache'}: {reason}{caveat}")
    fplan = module.plan(params, config.method, config.clusters, n, spec.dim, tokens)
    for stage in fplan.stages:
        lines.append(f"stage {stage.name}: {stage.steps_per_epoch:,} steps per epoch, {stage.total_steps:,} steps in total, "
                     f"{stage.images_per_step} items per step ({stage.total_steps * stage.images_per_step:,} item reads)")
    for what, size in fplan.memory:
        lines.append(f"memory: {what}: {gb(size)}")
    lines += [f"note: {note}" for note in fplan.notes]
    reads = sum(stage.total_steps * stage.images_per_step for stage in fplan.stages)
    if throughput is None:
        lines.append("time: give --throughput ITEMS_PER_S (measured on the target machine, e.g. by "
                     "benchmarks/bench_paper_scale.py) for an estimate")
    elif throughput <= 0:
        raise ConfigError(f"--throughput must be positive, got {throughput!r}")
    elif reads:
        lines.append(f"time: {reads:,} item reads at {throughput:g} items/s: about {reads / throughput / 3600:.1f} h")
    return lines


# ----------------------------------------------------------------------------- segmenter


@dataclass
class Prediction:
    labels: np.ndarray            # H x W int64 cluster ids (B x H x W from predict_tensors)
    probabilities: torch.Tensor | None   # C x H x W (after the CRF when enabled); None when not asked for


class Segmenter:
    """Backbone + method predictor + test-time recipe (resolution, flip, tiling, CRF).

    ``precision`` (auto | bf16 | fp32, default the run's ``precision``): the backbone and head run in
    bf16 autocast when it resolves to bf16 (auto: on a CUDA device); the CRF and the softmax before
    it always run in float32.
    """

    def __init__(self, config: RunConfig, backbone, predictor: Predictor, device: torch.device, path: Path | None = None,
                 precision: str | None = None):
        self.config = config
        self.backbone = backbone
        self.predictor = predictor.to(device).eval()
        self.device = device
        self.path = path
        self.precision = resolve_precision(precision or config.precision, device)

    @classmethod
    def from_run(cls, run: rundir.Run, backbone=None, device: str | None = None, precision: str | None = None) -> "Segmenter":
        config = run.config
        dev = init_distributed(device or config.device).device
        if backbone is None:
            backbone = build_backbone(config.backbone.name, config.backbone.weights, device=dev, **config.backbone.options)
        if backbone.weights_id != run.meta.get("backbone_weights_id"):
            warnings.warn(
                f"backbone weights differ from those the run in {run.path} was trained with "
                f"({backbone.weights_id} vs {run.meta.get('backbone_weights_id')})",
                stacklevel=2,
            )
        module = get_method(config.method)
        info = PredictorInfo(num_clusters=config.clusters, feature_dim=backbone.dim, stride=backbone.stride)
        try:
            predictor = module.build_predictor(_method_params(config), run.state, info)
        except KeyError as err:
            raise RunDirError(
                f"{run.path / rundir.WEIGHTS} does not hold a {config.method} model (no {err} tensor): "
                "the weights belong to another method or run"
            ) from None
        return cls(config, backbone, predictor, dev, run.path, precision)

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
        return data.eval_preprocess(self.resolution, multiple=self.backbone.stride, interpolation=self.config.test.interpolation)

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
        from .postprocess.crf import refine_batch

        rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return refine_batch(rgb.to(logp.device), logp)

    @torch.no_grad()
    def predict_tensors(self, images: torch.Tensor, crf: bool | None = None, probabilities: bool = True) -> Prediction:
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

    def predict_tensor(self, image: torch.Tensor, crf: bool | None = None) -> Prediction:
        """Prediction for one preprocessed image (3 x H x W float in [0, 1])."""
        pred = self.predict_tensors(image[None], crf)
        return Prediction(pred.labels[0], pred.probabilities[0])

    def predict(self, image, crf: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Cluster id per pixel (H x W) for a photo (path or PIL image) at its displayed size.

        A file above ``max_pixels`` is downscaled on load (with a warning) and labelled at that size.
        A PIL image is converted as a file is read (transparency composited onto white).
        """
        check_max_pixels(max_pixels)
        return self.predict_batch([image], crf, max_pixels)[0]

    def predict_batch(self, images: Sequence, crf: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      batch_size: int | None = None) -> list[np.ndarray]:
        """``predict`` of several photos (paths or PIL images), in their order; photos of the same
        preprocessed size go through the backbone and the head together (see ``predict_stream``).
        A PIL image is converted as a file is read (transparency composited onto white)."""
        check_max_pixels(max_pixels)
        pils = [to_rgb(im) if isinstance(im, Image.Image) else load_image(im, max_pixels=max_pixels) for im in images]
        names = [f"image {i}" if isinstance(im, Image.Image) else str(im) for i, im in enumerate(images)]
        labels = {i: lab for i, _, lab in self.predict_stream(enumerate(pils), crf, batch_size, name=names.__getitem__)}
        return [labels[i] for i in range(len(pils))]

    def predict_stream(self, items: Iterable[tuple[object, Image.Image]], crf: bool | None = None,
                       batch_size: int | None = None, *, name: Callable[[object], str] = str,
                       on_error: Callable[[object, Exception], None] | None = None,
                       ) -> Iterator[tuple[object, Image.Image, np.ndarray]]:
        """``(key, photo, labels at the photo's size)`` for each ``(key, PIL photo)`` of ``items``.

        Photos are grouped by preprocessed size and run ``batch_size`` (default: ``self.batch_size``)
        to a forward pass. At most ``batch_size`` photos are held: when that many
        wait, the largest same-size group runs, so results come out of input order. Memory stays
        bounded by the batch size, whatever the number of photos. ``name(key)`` names a photo in
        warnings. With ``on_error``, a photo that cannot be preprocessed or predicted (and
        the rest of its batch) is reported to it by key and the stream goes on.
        """
        size = batch_size or self.batch_size
        if size < 1:
            raise ConfigError(f"batch size must be at least 1, got {size}")
        groups: dict[tuple[int, ...], list[tuple[object, Image.Image, torch.Tensor]]] = {}

        def run(shape):
            group = groups.pop(shape)
            try:
                labels = self.predict_tensors(torch.stack([t for _, _, t in group]), crf, probabilities=False).labels
            except PREDICT_ERRORS as err:
                if on_error is None:
                    raise
                for key, _, _ in group:
                    on_error(key, err)
                return
            for (key, pil, _), lab in zip(group, labels):
                yield key, pil, self._displayed(lab, pil)

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
        capped at LONG_SIDE_FACTOR times it (a 1000 x 4 strip would otherwise become 80,000 pixels
        long), with a warning naming ``name``."""
        prep = self.preprocess()
        new_h, new_w = prep.resized_size(pil.height, pil.width)
        cap = LONG_SIDE_FACTOR * self.resolution
        if max(new_h, new_w) <= cap:
            return prep.apply(pil)[0]
        scale = cap / max(pil.height, pil.width)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        warnings.warn(
            f"{name}: {pil.width}x{pil.height} is a very elongated image; segmented at {size[0]}x{size[1]} "
            f"(longer side capped at {cap} px) instead of {new_w}x{new_h}",
            DataWarning,
            stacklevel=3,
        )
        pixels = np.asarray(pil.resize(size, Image.BILINEAR), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def _displayed(self, labels: np.ndarray, pil: Image.Image) -> np.ndarray:
        """Labels resized (nearest) from the preprocessed size to the photo's."""
        if labels.shape == (pil.height, pil.width):
            return labels
        return np.asarray(
            Image.fromarray(labels.astype(np.uint8 if self.num_clusters <= 256 else np.int32)).resize(
                (pil.width, pil.height), Image.NEAREST
            )
        )


def tiled_embed(embed: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
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


def load(run_dir: str | os.PathLike, device: str | None = None, precision: str | None = None) -> Segmenter:
    """Rebuild the Segmenter of a finished run directory (``precision``: auto | bf16 | fp32, default the run's)."""
    return Segmenter.from_run(rundir.load(run_dir), device=device, precision=precision)


# ----------------------------------------------------------------------------- evaluate


PROBES = ("clusters", "linear")


def linear_probe_segmenter(seg: Segmenter, state: dict[str, torch.Tensor] | None = None) -> Segmenter:
    """The Segmenter of a run's supervised linear probe: the method's embedding, then the probe's
    class logits (softmax of the logits themselves: alpha 1), for scoring with the identity mapping.
    ``state``: the run state (default: read from the Segmenter's run directory)."""
    import dataclasses

    config = seg.config
    keys = getattr(get_method(config.method), "LINEAR_PROBE", None)
    if state is None:
        state = rundir.load(seg.path).state if seg.path is not None else {}
    if keys is None or not all(k in state for k in keys):
        has = "this method has no linear probe" if keys is None else (
            "the run holds no linear probe (it is trained only when the training data has labels)")
        raise ConfigError(f"--probe linear: {has}")
    weight, bias = (state[k] for k in keys)
    probe = LinearProbe(seg.predictor, weight, bias)
    probe_config = dataclasses.replace(config, clusters=int(weight.shape[0]), test=dataclasses.replace(config.test, alpha=1.0))
    return Segmenter(probe_config, seg.backbone, probe, seg.device, seg.path)


def _protocols(matching: str | Sequence[str] | None, num_clusters: int, num_classes: int) -> list[str]:
    """The evaluation protocols asked for, in order, without repeats ("all": every one; "hungarian":
    the dataset-wide one). Default: dataset-wide Hungarian, many-to-one when K > C as before."""
    if matching is None or matching == [] or matching == ():
        return ["dataset" if num_clusters <= num_classes else "many-to-one"]
    asked = [matching] if isinstance(matching, str) else list(matching)
    out: list[str] = []
    for name in asked:
        names = list(PROTOCOLS) if name == "all" else ["dataset" if name == "hungarian" else name]
        for n in names:
            if n not in PROTOCOLS:
                raise ConfigError(f"unknown matching {name!r}; choose from {', '.join(PROTOCOLS)} or all")
            if n not in out:
                out.append(n)
    return out


def evaluate(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    crf: bool | None = None,
    flip: bool | None = None,
    matching: str | Sequence[str] | None = None,
    probe: str = "clusters",
    run_protocol: bool = True,
    json_path: str | os.PathLike | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
) -> dict:
    """Score a run on a labelled split under one or more protocols (``matching``: "dataset",
    "per-image", "many-to-one", a list of them or "all"; see ``evaluation.metrics``), all from one
    pass over the split.

    The top-level pixel_accuracy / miou / per_class_iou are those of the first protocol
    (``matching`` names it); ``protocols`` holds every one. ``mapping`` (cluster -> class, for the
    report's colours) is that of the first dataset-level protocol, else of the dataset-wide
    Hungarian matching.

    ``probe="linear"`` scores the run's supervised linear probe instead of its clusters (STEGO,
    CAUSE), with the identity mapping. A Leopart run fitted with ``params.protocol=reference`` is
    scored by the reference's protocol (``evaluate_leopart_reference``) unless ``run_protocol`` is
    False: then its predictions (as ``segment`` makes them) are scored like any run's.

    Images of the same size are scored ``batch_size`` at a time (default: the run's ``batch_size`` on
    a GPU, 1 on CPU; see ``Segmenter.batch_size``). ``precision`` (auto | bf16 | fp32) applies when
    ``run`` is a path.
    """
    if json_path is not None:
        check_writable_file(json_path, "--json file")
    seg = run if isinstance(run, Segmenter) else load(run, precision=precision)
    config = seg.config
    if probe not in PROBES:
        raise ConfigError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if run_protocol and probe == "clusters" and config.method == "leopart" and _method_params(config).protocol == "reference":
        return evaluate_leopart_reference(seg, dataset=dataset, root=root, split=split, json_path=json_path)
    crf = config.test.crf if crf is None else crf
    flip = config.test.flip if flip is None else flip
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    if probe == "linear":
        if matching:
            raise ConfigError("--probe linear predicts the classes themselves (identity mapping): leave out --matching")
        seg = linear_probe_segmenter(seg)
        if seg.num_clusters != data.num_classes:
            raise ConfigError(f"the linear probe predicts {seg.num_clusters} classes but {dataset} has {data.num_classes}")
        protocols = ["identity"]
    else:
        protocols = _protocols(matching, seg.num_clusters, data.num_classes)
    prep = seg.eval_preprocess(data)
    kwargs = dict(cache_dir=config.cache_dir, batch_size=config.batch_size, strict=True)
    store = extract_features(seg.backbone, data, prep, description=f"{split} features", **kwargs)
    flipped = extract_features(seg.backbone, data, prep, flip=True, description=f"{split} flipped", **kwargs) if flip else None
    confusion = ConfusionMatrix(seg.num_clusters, data.num_classes)
    per_image = PerImageHungarian(data.num_classes)
    chunks = same_shape_chunks(store, batch_size or seg.batch_size)
    for chunk in track(chunks, len(chunks), f"evaluating {dataset}/{split}"):
        labels = store.labels(chunk)
        scores = seg.scores(store.batch(chunk), flipped.batch(chunk) if flipped is not None else None,
                            tuple(labels.shape[-2:]))
        images = torch.stack([prep.apply(data[i].image)[0] for i in chunk]) if crf else None
        probs = seg._finish(scores, images, crf)
        for pred, label in zip(probs.argmax(1), labels):
            per_image.add(confusion.update(pred, label))
    matchings = {"dataset": "hungarian", "many-to-one": "many-to-one", "identity": "identity"}
    results = {name: per_image.scores() if name == "per-image" else score(confusion, matchings[name]) for name in protocols}
    mapping_from = next((n for n in protocols if n != "per-image"), "dataset")
    colours = results.get(mapping_from) or score(confusion, "hungarian")
    first = results[protocols[0]].to_dict(data.classes)
    report = {
        **first,
        "matching": protocols[0],
        "mapping": colours.mapping,
        "mapping_from": mapping_from,
        "protocols": {name: {k: v for k, v in r.to_dict(data.classes).items() if k not in ("matching", "mapping")}
                      for name, r in results.items()},
        "n_images": len(store),
        "dataset": dataset,
        "split": split,
        "crf": crf,
        "flip": flip,
        "probe": probe,
        "num_clusters": seg.num_clusters,
        "confusion": confusion.matrix.tolist(),
        "unsupseg_version": __version__,
    }
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if seg.path is not None:
        key = f"metrics_{dataset}_{split}{'_linear' if probe == 'linear' else ''}{'_crf' if crf else ''}"
        rundir.update_meta(seg.path, **{key: {
            "pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"], "matching": protocols[0],
            "protocols": {name: {k: p[k] for k in ("pixel_accuracy", "miou")} for name, p in report["protocols"].items()}}})
    return report


def evaluate_leopart_reference(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Leopart's fully unsupervised protocol (spec leopart.md §2.8-2.9) on a run fitted with
    ``params.protocol=reference``: the split's labels at map_size x map_size (its own foreground
    clusters, nearest-replicated pixels), one community table per Infomap seed, ground truth
    nearest-resized to map_size, Leopart's IoU-based Hungarian matching; mean and population std
    over the seeds (percent)."""
    seg = run if isinstance(run, Segmenter) else load(run)
    params = _method_params(seg.config)
    if split != params.eval_split:
        raise ConfigError(f"this run clustered {params.eval_split!r} together with its training data "
                          f"(params.protocol=reference); evaluate --split {params.eval_split}")
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = seg.eval_preprocess(data)
    store = extract_features(seg.backbone, data, prep, cache_dir=seg.config.cache_dir, batch_size=seg.config.batch_size,
                             strict=True, description=f"{split} features")
    size = params.map_size
    confusions = None
    for i in track(range(len(store)), len(store), f"evaluating {dataset}/{split} (Leopart reference protocol)"):
        maps = seg.predictor.reference_label_maps(store[i], seg.backbone.stride, size)
        label = F.interpolate(store.label(i)[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        if confusions is None:
            confusions = [ConfusionMatrix(seg.num_clusters, data.num_classes) for _ in range(len(maps))]
        for confusion, labels in zip(confusions, maps):
            confusion.update(labels, label)
    runs = [leopart_score(c, "hungarian-iou") for c in confusions]
    miou = np.array([100 * r.miou for r in runs])
    accuracy = np.array([100 * r.pixel_accuracy for r in runs])
    report = {
        "protocol": "leopart-reference",
        "matching": "hungarian-iou",
        "map_size": size,
        "dataset": dataset,
        "split": split,
        "n_images": len(store),
        "num_clusters": seg.num_clusters,
        "seeds": list(range(1, len(runs) + 1)),
        "miou": float(miou.mean()),
        "miou_std": float(miou.std()),
        "pixel_accuracy": float(accuracy.mean()),
        "pixel_accuracy_std": float(accuracy.std()),
        "per_seed": [{"seed": k + 1, "miou": float(m), "pixel_accuracy": float(a)}
                     for k, (m, a) in enumerate(zip(miou, accuracy))],
        "per_class_iou": {name: round(float(100 * np.mean([r.iou[c] for r in runs])), 4)
                          for c, name in enumerate(data.classes)},
        "unsupseg_version": __version__,
    }
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if seg.path is not None:
        rundir.update_meta(seg.path, **{f"metrics_{dataset}_{split}_reference": {
            "pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"], "miou_std": report["miou_std"]}})
    return report


def same_shape_chunks(store, batch_size: int) -> list[list[int]]:
    """The store's indices in order, cut into runs of at most ``batch_size`` consecutive images with
    the same feature and label shapes (one forward each)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    chunks: list[list[int]] = []
    key = None
    for i in range(len(store)):
        shape = (store.shapes[i], store.label_shapes[i] if store.label_shapes is not None else None)
        if chunks and shape == key and len(chunks[-1]) < batch_size:
            chunks[-1].append(i)
        else:
            chunks.append([i])
            key = shape
    return chunks


def evaluate_overcluster(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    ks: Sequence[int] = (100, 300, 500),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Over-clustering protocol (Leopart, benchmarks.md 6.4) on the run's backbone features of a split:
    standardise, PCA 50, k-means with each K, many-to-one matching; mean and std over seeds."""
    from .evaluation.overcluster import overcluster_scores

    if json_path is not None:
        check_writable_file(json_path, "--json file")
    seg = run if isinstance(run, Segmenter) else load(run)
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = seg.eval_preprocess(data)
    store = extract_features(seg.backbone, data, prep, cache_dir=seg.config.cache_dir,
                             batch_size=seg.config.batch_size, strict=True, description=f"{split} features")
    labels = [store.label(i) for i in range(len(store))]
    results = {int(k): overcluster_scores(store, labels, data.num_classes, int(k), seeds=seeds) for k in ks}
    report = {"dataset": dataset, "split": split, "n_images": len(store), "backbone": seg.backbone.name,
              "matching": "many-to-one", "results": results}
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=float))
    return report


# ----------------------------------------------------------------------------- segment


# Beside the masks: which run (and CRF setting) wrote them, so that a later call does not mix runs in
# one folder, and a folder holding it is known to hold outputs (never read back as inputs).
SEGMENT_RECORD = ".unsupseg-segment.json"


def check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive number of pixels (or None: no limit), got {max_pixels!r}")


@dataclass(frozen=True)
class OutputItem:
    """One input image and the two files ``segment`` writes for it."""

    source: Path
    name: str          # output name without extension, relative to the output folder (posix)
    mask: Path
    overlay: Path

    def done(self) -> bool:
        return self.mask.exists() and self.overlay.exists()


def _is_output_file(path: Path) -> bool:
    return path.suffix.lower() == ".png" or path.name.endswith("_overlay.jpg")


def _output_roots(folder: Path) -> list[Path]:
    """Folders in, under or above ``folder`` that hold segment outputs (they have a SEGMENT_RECORD)."""
    roots = [rec.parent.absolute() for rec in folder.rglob(SEGMENT_RECORD)]
    roots += [parent for parent in folder.absolute().parents if (parent / SEGMENT_RECORD).is_file()]
    return roots


def plan_outputs(paths: Sequence[str | os.PathLike], out: str | os.PathLike, strict: bool = False) -> list[OutputItem]:
    """Every input image under ``paths`` with its output files in ``out``.

    Output names mirror the inputs' folders below their common folder (a/x.png and b/x.png become
    a/x.png and b/x.png in ``out``); an image given twice is segmented once. Masks and overlays found
    in an output folder inside an input folder are not inputs. OutputError when two inputs would
    share an output, or an output would land on an input file.
    """
    out = Path(out)
    sources: list[tuple[Path, Path]] = []     # (image, the folder its name is relative to)
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"input {p} does not exist")
        if p.is_dir():
            roots = _output_roots(p)

            def earlier_output(f: Path) -> bool:
                return _is_output_file(f) and any(f.absolute().is_relative_to(r) for r in roots)

            sources += [(f, p) for f in ImageFolder(p, strict=strict, exclude=earlier_output).files()]
        else:
            sources.append((p, p.parent))
    if not sources:
        return []
    common = Path(os.path.commonpath([str(base.absolute()) for _, base in sources]))
    items: list[OutputItem] = []
    seen: dict[Path, Path] = {}
    names: dict[str, Path] = {}
    for f, _ in sources:
        real = f.resolve()
        if real in seen:
            continue
        seen[real] = f
        name = f.absolute().relative_to(common).with_suffix("").as_posix()
        if name in names:
            raise OutputError(f"{names[name]} and {f} would both be written as {out / name}.png; "
                              "rename one, or segment them into separate --out folders")
        names[name] = f
        items.append(OutputItem(f, name, out / f"{name}.png", out / f"{name}_overlay.jpg"))
    for item in items:
        for target in (item.mask, item.overlay):
            if target.resolve() in seen:
                raise OutputError(f"the output {target} would replace the input image {seen[target.resolve()]}; "
                                  "choose another --out (nothing was written)")
    return items


def _run_identity(seg: Segmenter, crf: bool) -> dict:
    digest = hashlib.sha256(json.dumps(to_dict(seg.config), sort_keys=True, default=str).encode())
    digest.update(str(seg.backbone.weights_id).encode())
    for key, value in sorted(seg.predictor.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"run": str(seg.path.absolute()) if seg.path is not None else None, "method": seg.config.method,
            "model_sha256": digest.hexdigest(), "crf": crf}


def claim_output_folder(seg: Segmenter, out: Path, items: list[OutputItem], crf: bool, overwrite: bool) -> None:
    """Check ``out`` takes files, refuse to mix another run's masks in, and record this run there."""
    check_writable_dir(out, "--out folder")
    mine = _run_identity(seg, crf)
    record = out / SEGMENT_RECORD
    if record.is_file() and not overwrite:
        try:
            theirs = json.loads(record.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            theirs = {}
        if (theirs.get("model_sha256"), theirs.get("crf")) != (mine["model_sha256"], mine["crf"]):
            raise OutputError(
                f"{out} holds the masks of another run ({theirs.get('run')}, method {theirs.get('method')}, "
                f"CRF {'on' if theirs.get('crf') else 'off'}); choose another --out, or pass --overwrite to "
                "replace them with this run's"
            )
    elif not record.is_file() and not overwrite:
        found = next((item for item in items if item.mask.exists() or item.overlay.exists()), None)
        if found is not None:
            raise OutputError(
                f"{out} already holds files named like this call's outputs (e.g. {found.mask.name}) that no "
                "segment call recorded; choose another --out, or pass --overwrite to replace them"
            )
    atomic_write_text(record, json.dumps(mine, indent=2))


def write_outputs(item: OutputItem, image: Image.Image, labels: np.ndarray, num_clusters: int) -> None:
    """The mask (cluster id per pixel, 8- or 16-bit PNG) and the overlay, each written atomically."""
    dtype = np.uint8 if num_clusters <= 256 else np.uint16
    with atomic_path(item.mask) as tmp:
        Image.fromarray(labels.astype(dtype)).save(tmp, format="PNG")
    with atomic_path(item.overlay) as tmp:
        overlay(image, labels, num_clusters).save(tmp, format="JPEG", quality=90)


class SegmentResult(list):
    """The masks written (a list of paths), with the images ``skipped`` because their outputs were
    already there and those that ``failed`` (unreadable or not segmentable, with a warning each)."""

    def __init__(self):
        super().__init__()
        self.skipped: list[Path] = []
        self.failed: list[Path] = []


def segment(
    run: str | os.PathLike | Segmenter,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    crf: bool | None = None,
    overwrite: bool = False,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int | None = None,
    precision: str | None = None,
) -> SegmentResult:
    """Write ``<name>.png`` (cluster id per pixel, at the photo's displayed size) and
    ``<name>_overlay.jpg`` for every input image; returns the masks written, in the order written.

    Photos of the same size are segmented ``batch_size`` at a time (default: the run's ``batch_size``
    on a GPU, 1 on CPU; see ``Segmenter.batch_size``); at most that many are held (bounded memory).
    Under torchrun each process takes every world-size-th image of the sorted inputs, so the
    processes share the work and no two write the same file. Images whose outputs exist are skipped
    (counted in ``result.skipped``) unless ``overwrite``; an image that cannot be read or segmented
    is skipped with a warning naming it (an error when ``strict``); images above ``max_pixels`` are
    downscaled with a warning and their outputs written at that size. Every file is written
    atomically. ``out`` records the run; masks of another run there are an error unless
    ``overwrite``. Nothing is ever written onto an input. ``precision`` (auto | bf16 | fp32)
    applies when ``run`` is a path.
    """
    check_max_pixels(max_pixels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder for the masks and overlays")
    items = plan_outputs(inputs, out, strict)
    seg = run if isinstance(run, Segmenter) else load(run, precision=precision)
    crf = seg.config.test.crf if crf is None else crf
    dist = init_distributed(seg.device.type)
    if dist.is_main:
        claim_output_folder(seg, out, items, crf, overwrite)
        # temporary files of earlier calls that were killed (kill -9 skips the clean-up); a live
        # neighbour's are left alone
        remove_stale_temporaries(out, recursive=True)
    dist.barrier()
    result = SegmentResult()
    mine = items[dist.rank :: dist.world_size]

    def failed(item, err: Exception) -> None:
        if strict:
            raise err if isinstance(err, DataError) else DataError(f"{item.source}: cannot segment ({err})") from err
        warnings.warn(f"skipping {item.source}: {err}" if not isinstance(err, DataError)
                      else f"skipping unreadable image: {err}", DataWarning, stacklevel=3)
        result.failed.append(item.source)

    def todo():
        for item in track(mine, len(mine), "segmenting"):
            if not overwrite and item.done():
                result.skipped.append(item.source)
                continue
            try:
                image = load_image(item.source, max_pixels=max_pixels)
            except DataError as err:
                failed(item, err)
                continue
            yield item, image

    stream = seg.predict_stream(todo(), crf=crf, batch_size=batch_size, name=lambda item: str(item.source), on_error=failed)
    for item, image, labels in stream:
        write_outputs(item, image, labels, seg.num_clusters)
        result.append(item.mask)
    return result


# ----------------------------------------------------------------------------- segment-image


# K searched by ``segment_image(clusters="auto")``: one photo holds a handful of parts, not 40
IMAGE_CLUSTERS_RANGE = (2, 12)


def segment_image(
    photo: str | os.PathLike,
    out: str | os.PathLike,
    *,
    clusters: int | str = "auto",
    backbone: str = "efficientnet_lite0",
    backbone_weights: str = "auto",
    resolution: int = 320,
    crf: bool = True,
    flip: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] | None = None,
) -> Segmenter:
    """Partition one photo from its own features, training-free, into ``out``: the mask and overlay
    that ``segment`` writes (``unsupseg.reporting.build_report(seg, ..., images=photo)`` adds the report).

    The photo's tokens (flip-averaged, as the Segmenter embeds them) are clustered by cosine k-means
    into ``clusters`` parts ("auto": estimated from the photo, see ``features.partition``); pixels
    then take the part of highest cosine score, refined by the dense CRF (``crf``, on by default).
    Returns the in-memory Segmenter of this one photo (it segments other photos with the same parts).
    """
    from .features.partition import partition_tokens
    from .methods.kmeans import KMeansPredictor

    log = log or (lambda msg: console.print(msg))
    check_max_pixels(max_pixels)
    if clusters != AUTO and (isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1):
        raise ConfigError(f"clusters must be a positive number or 'auto', got {clusters!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder for the mask, overlay and report")
    pil = load_image(photo, max_pixels=max_pixels)
    config = resolve_config("kmeans", preset="default", overrides=[f"seed={seed}", f"data.resolution={resolution}",
                            f"test.crf={json.dumps(crf)}", f"test.flip={json.dumps(flip)}"],
                            **{"backbone.name": backbone, "backbone.weights": backbone_weights,
                               "data.images": str(Path(photo).absolute()), "clusters": 1})
    device = init_distributed(config.device).device
    net = build_backbone(config.backbone.name, config.backbone.weights, device=device, **config.backbone.options)
    # the Segmenter's own path to the tokens (preprocess, stride padding, flip averaging): the parts are
    # fitted on exactly the embedding they are scored on
    probe = Segmenter(config, net, KMeansPredictor(torch.zeros(1, net.dim)), device)
    image = probe.model_input(pil, str(photo))[None].to(device)
    s = net.stride
    batch = F.pad(image, (0, -image.shape[-1] % s, 0, -image.shape[-2] % s), mode="replicate")
    with torch.no_grad():
        emb = probe._embed(net(batch))
        if flip:
            emb = (emb + probe._embed(net(batch.flip(-1))).flip(-1)) / 2
    tic = time.perf_counter()
    try:
        centroids, count = partition_tokens(emb[0].cpu(), None if clusters == AUTO else clusters,
                                            torch.Generator().manual_seed(seed), k_range=IMAGE_CLUSTERS_RANGE)
    except ValueError as err:
        raise ConfigError(f"{photo}: {err}") from None
    k = len(centroids)
    how = f"chosen by modularity in {IMAGE_CLUSTERS_RANGE[0]}..{IMAGE_CLUSTERS_RANGE[1]}" if count else "given"
    log(f"{photo}: {k} parts ({how}) from {emb.shape[-2]}x{emb.shape[-1]} tokens, {time.perf_counter() - tic:.1f} s")
    config.clusters = k
    seg = Segmenter(config, net, KMeansPredictor(centroids), device)
    segment(seg, [photo], out, crf=crf, overwrite=overwrite, strict=True, max_pixels=max_pixels)
    return seg
