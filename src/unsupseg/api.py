"""The Python face of unsupseg: ``fit``, ``load``, ``Segmenter.predict``, ``evaluate``, ``segment``.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__, rundir
from ._io import atomic_path, atomic_write_text
from ._progress import console, track
from .backbones import build_backbone
from .config import (
    RunConfig,
    apply_overrides,
    from_dict,
    has_preset,
    load_preset,
    merge,
    to_dict,
)
from .data import CroppedDataset, ImageFolder, Preprocess, build_dataset, load_image
from .data.images import DEFAULT_MAX_PIXELS
from .engine import init_distributed
from .errors import ConfigError, DataError
from .evaluation.metrics import PROTOCOLS, ConfusionMatrix, PerImageHungarian, score
from .evaluation.visualize import overlay
from .features.extract import extract_features
from .methods import get_method
from .methods.base import FitContext, Predictor, PredictorInfo

__all__ = ["Segmenter", "evaluate", "fit", "load", "resolve_config", "segment"]


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
    # the method's own dataclass checks the params section (unknown keys name the closest one)
    params = from_dict(get_method(method).Params, config.params, "params")
    config.params = to_dict(params)
    _check_auto_clusters(config)
    return config


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
    d = config.data
    if d.crops:
        return CroppedDataset(d.crops)
    if d.images:
        return ImageFolder(d.images, strict=d.strict)
    if d.dataset:
        if not d.root:
            raise ConfigError(f"dataset {d.dataset!r} needs --root (the folder that holds it)")
        return build_dataset(d.dataset, d.root, d.split)
    raise ConfigError("nothing to train on: give --images DIR, or --dataset NAME --root DIR --split S")


def _train_preprocess(config: RunConfig, stride: int, resolution: int | None = None) -> Preprocess:
    d = config.data
    return Preprocess(resolution or d.resolution, mode=d.mode, interpolation=d.interpolation, multiple=stride)


# ----------------------------------------------------------------------------- fit


def fit(
    method: str = "kmeans",
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

    ``clusters="auto"`` estimates K from the training features first (``choose_clusters``); the run's
    config.yaml then holds the chosen K and meta.json the criterion's curve (``clusters_auto``).
    An interrupted fit with the same configuration resumes from its last checkpoint.
    """
    log = log or (lambda msg: console.print(msg))
    config = resolve_config(
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
    dist = init_distributed(config.device)
    out = Path(out)
    resuming = rundir.prepare(out, config, overwrite) if dist.is_main else False
    dist.barrier()
    if resuming:
        log(f"resuming the unfinished run in {out}")
    torch.manual_seed(config.seed)
    train_data = build_train_dataset(config)
    net = build_backbone(config.backbone.name, config.backbone.weights, device=dist.device, **config.backbone.options)
    cache_dir = config.cache_dir

    def features(resolution: int | None = None, flip: bool = False):
        prep = _train_preprocess(config, net.stride, resolution)
        store = extract_features(
            net, train_data, prep, cache_dir=cache_dir, batch_size=config.batch_size, flip=flip,
            strict=config.data.strict, description=f"features {prep.resolution}px",
        )
        log(
            f"feature cache {'hit' if store.hit else 'miss'}: {len(store)} images at {prep.resolution}px "
            f"({'backbone skipped' if store.hit else 'extracted and cached'}) in {store.path}"
        )
        return store

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


# ----------------------------------------------------------------------------- segmenter


@dataclass
class Prediction:
    labels: np.ndarray            # H x W int64 cluster ids
    probabilities: torch.Tensor   # C x H x W (after the CRF when enabled)


class Segmenter:
    """Backbone + method predictor + test-time recipe (resolution, flip, tiling, CRF)."""

    def __init__(self, config: RunConfig, backbone, predictor: Predictor, device: torch.device, path: Path | None = None):
        self.config = config
        self.backbone = backbone
        self.predictor = predictor.to(device).eval()
        self.device = device
        self.path = path

    @classmethod
    def from_run(cls, run: rundir.Run, backbone=None, device: str | None = None) -> "Segmenter":
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
        predictor = module.build_predictor(_method_params(config), run.state, info)
        return cls(config, backbone, predictor, dev, run.path)

    @property
    def num_clusters(self) -> int:
        return self.config.clusters

    @property
    def resolution(self) -> int:
        return self.config.test.resolution or self.config.data.resolution

    def preprocess(self) -> Preprocess:
        return Preprocess(self.resolution, mode="short", interpolation="bilinear")

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
        """B x C x H x W scores from B x D x h x w features (and those of the flipped images)."""
        emb = self._embed(features.to(self.device).float())
        if flipped is not None:
            emb = (emb + self._embed(flipped.to(self.device).float()).flip(-1)) / 2
        if self.predictor.upsample_scores:
            return F.interpolate(self.predictor.classify(emb), size=size, mode="bilinear", align_corners=False)
        return self.predictor.classify(F.interpolate(emb, size=size, mode="bilinear", align_corners=False))

    def _finish(self, scores: torch.Tensor, images: torch.Tensor | None, crf: bool) -> torch.Tensor:
        """Probabilities B x C x H x W: softmax(alpha * scores), refined by the CRF when asked."""
        logp = torch.log_softmax(self.config.test.alpha * scores.float(), dim=1)
        if not crf:
            return logp.exp()
        from .postprocess.crf import refine_batch

        rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return refine_batch(rgb.to(logp.device), logp)

    @torch.no_grad()
    def predict_tensor(self, image: torch.Tensor, crf: bool | None = None) -> Prediction:
        """Prediction for one preprocessed image (3 x H x W float in [0, 1])."""
        crf = self.config.test.crf if crf is None else crf
        h, w = image.shape[-2:]
        s = self.backbone.stride
        # pad (edge replication) up to a multiple of the stride, so every pixel is predicted
        batch = F.pad(image[None].to(self.device), (0, -w % s, 0, -h % s), mode="replicate")
        feats = self.backbone(batch)
        flipped = self.backbone(batch.flip(-1)) if self.config.test.flip else None
        scores = self.scores(feats, flipped, tuple(batch.shape[-2:]))[:, :, :h, :w]
        probs = self._finish(scores, batch[:, :, :h, :w], crf)[0]
        return Prediction(probs.argmax(0).cpu().numpy(), probs.cpu())

    def predict(self, image, crf: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Cluster id per pixel (H x W) for a photo (path or PIL image) at its displayed size.

        A file above ``max_pixels`` is downscaled on load (with a warning) and labelled at that size.
        """
        pil = load_image(image, max_pixels=max_pixels) if not isinstance(image, Image.Image) else image.convert("RGB")
        tensor, _ = self.preprocess().apply(pil)
        labels = self.predict_tensor(tensor, crf).labels
        if labels.shape != (pil.height, pil.width):
            labels = np.asarray(
                Image.fromarray(labels.astype(np.uint8 if self.num_clusters <= 256 else np.int32)).resize(
                    (pil.width, pil.height), Image.NEAREST
                )
            )
        return labels


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


def load(run_dir: str | os.PathLike, device: str | None = None) -> Segmenter:
    """Rebuild the Segmenter of a finished run directory."""
    return Segmenter.from_run(rundir.load(run_dir), device=device)


# ----------------------------------------------------------------------------- evaluate


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
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Score a run on a labelled split under one or more protocols (``matching``: "dataset",
    "per-image", "many-to-one", a list of them or "all"; see ``evaluation.metrics``), all from one
    pass over the split.

    The top-level pixel_accuracy / miou / per_class_iou are those of the first protocol
    (``matching`` names it); ``protocols`` holds every one. ``mapping`` (cluster -> class, for the
    report's colours) is that of the first dataset-level protocol, else of the dataset-wide
    Hungarian matching.
    """
    seg = run if isinstance(run, Segmenter) else load(run)
    config = seg.config
    crf = config.test.crf if crf is None else crf
    flip = config.test.flip if flip is None else flip
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    protocols = _protocols(matching, seg.num_clusters, data.num_classes)
    prep = data.eval_preprocess(seg.resolution, multiple=seg.backbone.stride)
    kwargs = dict(cache_dir=config.cache_dir, batch_size=config.batch_size, strict=True)
    store = extract_features(seg.backbone, data, prep, description=f"{split} features", **kwargs)
    flipped = extract_features(seg.backbone, data, prep, flip=True, description=f"{split} flipped", **kwargs) if flip else None
    confusion = ConfusionMatrix(seg.num_clusters, data.num_classes)
    per_image = PerImageHungarian(data.num_classes)
    for i in track(range(len(store)), len(store), f"evaluating {dataset}/{split}"):
        label = store.label(i)
        scores = seg.scores(store.batch([i]), flipped.batch([i]) if flipped is not None else None, tuple(label.shape))
        image = prep.apply(data[i].image)[0][None] if crf else None
        probs = seg._finish(scores, image, crf)
        per_image.add(confusion.update(probs.argmax(1)[0], label))
    results = {
        name: per_image.scores() if name == "per-image"
        else score(confusion, "hungarian" if name == "dataset" else "many-to-one")
        for name in protocols
    }
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
        "num_clusters": seg.num_clusters,
        "confusion": confusion.matrix.tolist(),
        "unsupseg_version": __version__,
    }
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if seg.path is not None:
        rundir.update_meta(seg.path, **{f"metrics_{dataset}_{split}{'_crf' if crf else ''}": {
            "pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"], "matching": protocols[0],
            "protocols": {name: {k: p[k] for k in ("pixel_accuracy", "miou")} for name, p in report["protocols"].items()}}})
    return report


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

    seg = run if isinstance(run, Segmenter) else load(run)
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = data.eval_preprocess(seg.resolution, multiple=seg.backbone.stride)
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


def _inputs(paths: Iterable[str | os.PathLike], strict: bool) -> list[tuple[str, Path]]:
    """(output name without extension, image path) for every image file under ``paths``."""
    items = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"input {p} does not exist")
        if p.is_dir():
            folder = ImageFolder(p, strict=strict)
            items += [(sid, f) for sid, f in zip(folder.ids, folder.files())]
        else:
            items.append((p.stem, p))
    return items


def segment(
    run: str | os.PathLike | Segmenter,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    crf: bool | None = None,
    overwrite: bool = False,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Path]:
    """Write ``<name>.png`` (cluster id per pixel, at the photo's displayed size) and
    ``<name>_overlay.jpg`` for every input image, one image at a time (bounded memory).

    Images whose outputs exist are skipped unless ``overwrite``; unreadable images are skipped with a
    warning (an error when ``strict``); images above ``max_pixels`` are downscaled with a warning and
    their outputs written at that size. Every file is written atomically.
    """
    seg = run if isinstance(run, Segmenter) else load(run)
    out = Path(out)
    # temporary files left by an interrupted earlier call (kill -9 skips the clean-up) go first
    for stale in out.glob(".*.tmp") if out.is_dir() else []:
        stale.unlink(missing_ok=True)
    written: list[Path] = []
    items = _inputs(inputs, strict)
    for name, path in track(items, len(items), "segmenting"):
        mask_path, overlay_path = out / f"{name}.png", out / f"{name}_overlay.jpg"
        if not overwrite and mask_path.exists() and overlay_path.exists():
            continue
        try:
            image = load_image(path, max_pixels=max_pixels)
        except DataError as err:
            if strict:
                raise
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            continue
        labels = seg.predict(image, crf=crf)
        dtype = np.uint8 if seg.num_clusters <= 256 else np.uint16
        with atomic_path(mask_path) as tmp:
            Image.fromarray(labels.astype(dtype)).save(tmp, format="PNG")
        with atomic_path(overlay_path) as tmp:
            overlay(image, labels, seg.num_clusters).save(tmp, format="JPEG", quality=90)
        written.append(mask_path)
    return written
