"""The Python face of unsupseg: ``fit``, ``load``, ``Segmenter.predict``, ``evaluate``, ``segment``.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
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
from .data import CroppedDataset, ImageFolder, Preprocess, build_dataset, load_image
from .data.images import DEFAULT_MAX_PIXELS, DataWarning, to_rgb
from .engine import init_distributed
from .errors import ConfigError, DataError, OutputError, RunDirError
from .evaluation.metrics import ConfusionMatrix, score
from .evaluation.visualize import overlay
from .features.extract import extract_features
from .methods import get_method
from .methods.base import FitContext, Predictor, PredictorInfo

__all__ = ["Segmenter", "evaluate", "fit", "load", "resolve_config", "segment"]

# A photo's longer side is processed at most this many times the test resolution (see model_input).
LONG_SIDE_FACTOR = 8


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
    method: str | None = None,
    *,
    out: str | os.PathLike,
    backbone: str | None = None,
    backbone_weights: str | None = None,
    images: str | os.PathLike | None = None,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str | None = None,
    clusters: int | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> "Segmenter":
    """Fit ``method`` and write a run directory at ``out``; returns its Segmenter.

    ``method`` None: the config file's method, else kmeans. An interrupted fit with the same
    configuration resumes from its last checkpoint; a fit that fails before its first checkpoint
    leaves nothing behind.
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
    _absolute_paths(config)
    dist = init_distributed(config.device)
    out = Path(out)
    created = not out.exists()
    if dist.is_main:
        _check_cache_dir(config)
    resuming = rundir.prepare(out, config, overwrite) if dist.is_main else False
    dist.barrier()
    if resuming:
        log(f"resuming the unfinished run in {out}")
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
        store = extract_features(
            net, train_data, prep, cache_dir=cache_dir, batch_size=config.batch_size, flip=flip,
            strict=config.data.strict, description=f"features {prep.resolution}px",
        )
        log(
            f"feature cache {'hit' if store.hit else 'miss'}: {len(store)} images at {prep.resolution}px "
            f"({'backbone skipped' if store.hit else 'extracted and cached'}) in {store.path}"
        )
        check_clusters(config.clusters, tokens=sum(shape[1] * shape[2] for shape in store.shapes))
        return store

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
        try:
            predictor = module.build_predictor(_method_params(config), run.state, info)
        except KeyError as err:
            raise RunDirError(
                f"{run.path / rundir.WEIGHTS} does not hold a {config.method} model (no {err} tensor): "
                "the weights belong to another method or run"
            ) from None
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
        A PIL image is converted as a file is read (transparency composited onto white).
        """
        check_max_pixels(max_pixels)
        if isinstance(image, Image.Image):
            # as a file is read: transparency composited onto white, 16-bit scaled
            return self.predict_image(to_rgb(image), crf)
        return self.predict_image(load_image(image, max_pixels=max_pixels), crf, name=str(image))

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

    def predict_image(self, pil: Image.Image, crf: bool | None = None, name: str = "image") -> np.ndarray:
        """Cluster id per pixel (H x W) for an RGB PIL image; ``name`` is used in warnings."""
        labels = self.predict_tensor(self.model_input(pil, name), crf).labels
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


def evaluate(
    run: str | os.PathLike | Segmenter,
    *,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    crf: bool | None = None,
    flip: bool | None = None,
    matching: str | None = None,
    json_path: str | os.PathLike | None = None,
) -> dict:
    """Score a run on a labelled split (confusion over the whole split, then matching)."""
    if json_path is not None:
        check_writable_file(json_path, "--json file")
    seg = run if isinstance(run, Segmenter) else load(run)
    config = seg.config
    crf = config.test.crf if crf is None else crf
    flip = config.test.flip if flip is None else flip
    data = build_dataset(dataset, str(root), split)
    if data.num_classes is None:
        raise ConfigError(f"dataset {dataset!r} split {split!r} has no labels to evaluate against")
    prep = data.eval_preprocess(seg.resolution, multiple=seg.backbone.stride)
    kwargs = dict(cache_dir=config.cache_dir, batch_size=config.batch_size, strict=True)
    store = extract_features(seg.backbone, data, prep, description=f"{split} features", **kwargs)
    flipped = extract_features(seg.backbone, data, prep, flip=True, description=f"{split} flipped", **kwargs) if flip else None
    matching = matching or ("hungarian" if seg.num_clusters <= data.num_classes else "many-to-one")
    confusion = ConfusionMatrix(seg.num_clusters, data.num_classes)
    for i in track(range(len(store)), len(store), f"evaluating {dataset}/{split}"):
        label = store.label(i)
        scores = seg.scores(store.batch([i]), flipped.batch([i]) if flipped is not None else None, tuple(label.shape))
        image = prep.apply(data[i].image)[0][None] if crf else None
        probs = seg._finish(scores, image, crf)
        confusion.update(probs.argmax(1)[0], label)
    result = score(confusion, matching)
    report = {
        **result.to_dict(data.classes),
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
            "pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"]}})
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

    if json_path is not None:
        check_writable_file(json_path, "--json file")
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
) -> SegmentResult:
    """Write ``<name>.png`` (cluster id per pixel, at the photo's displayed size) and
    ``<name>_overlay.jpg`` for every input image, one image at a time (bounded memory).

    Images whose outputs exist are skipped (counted in ``result.skipped``) unless ``overwrite``;
    an image that cannot be read or segmented is skipped with a warning naming it (an error when
    ``strict``); images above ``max_pixels`` are downscaled with a warning and their outputs written
    at that size. Every file is written atomically. ``out`` records the run; masks of another run
    there are an error unless ``overwrite``. Nothing is ever written onto an input.
    """
    check_max_pixels(max_pixels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder for the masks and overlays")
    items = plan_outputs(inputs, out, strict)
    seg = run if isinstance(run, Segmenter) else load(run)
    crf = seg.config.test.crf if crf is None else crf
    claim_output_folder(seg, out, items, crf, overwrite)
    # temporary files of earlier calls that were killed (kill -9 skips the clean-up); a live
    # neighbour's are left alone
    remove_stale_temporaries(out, recursive=True)
    result = SegmentResult()
    for item in track(items, len(items), "segmenting"):
        if not overwrite and item.done():
            result.skipped.append(item.source)
            continue
        try:
            image = load_image(item.source, max_pixels=max_pixels)
            labels = seg.predict_image(image, crf, name=str(item.source))
        except (DataError, RuntimeError, ValueError, MemoryError) as err:
            if strict:
                raise err if isinstance(err, DataError) else DataError(f"{item.source}: cannot segment ({err})") from err
            warnings.warn(f"skipping {item.source}: {err}" if not isinstance(err, DataError)
                          else f"skipping unreadable image: {err}", DataWarning, stacklevel=2)
            result.failed.append(item.source)
            continue
        write_outputs(item, image, labels, seg.num_clusters)
        result.append(item.mask)
    return result
