"""``fit`` (train a method and write its run directory) and ``plan`` (what a fit would do)."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import rundir
from .._progress import console
from ..backbones import build_backbone
from ..config import (
    RunConfig,
    check_clusters,
)
from ..data import CropView
from ..engine import init_distributed
from ..errors import ConfigError
from ..features.source import open_features
from ..methods.base import FitContext, Method
from .resolve import (
    AUTO,
    _absolute_paths,
    _check_cache_dir,
    _train_preprocess,
    build_train_dataset,
    choose_clusters,
    fit_run,
    resolve_method,
)
from .segmenter import Segmenter


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
    config, impl, params = fit_run(method, backbone=backbone, backbone_weights=backbone_weights, images=images,
                                   dataset=dataset, root=root, split=split, clusters=clusters, preset=preset,
                                   config_file=config_file, overrides=overrides)
    _absolute_paths(config)
    dist = init_distributed(config.device, config.precision)
    out = Path(out)
    # the writing lock removes the folder it made when the fit leaves it empty
    with rundir.writing(out) if dist.is_main else contextlib.nullcontext():
        resuming = rundir.prepare(out, config, overwrite) if dist.is_main else False
        dist.barrier()
        if resuming:
            log(f"resuming the unfinished run in {out}")
        if dist.precision == "bf16":
            log(f"training steps in bf16 autocast on {dist.device} (float32 weights); "
                "--set precision=fp32 turns it off")
        try:
            # after --out is known to be writable, so that a bad --out creates no cache folder either
            if dist.is_main and config.data.cache != "never":   # never: not a byte, not a folder in the cache
                _check_cache_dir(config)
            return _fit(config, impl, params, out, dist, log)
        except BaseException:
            if dist.is_main:
                rundir.abandon(out)
            raise


def _fit(config: RunConfig, impl: Method, params, out: Path, dist, log: Callable[[str], None]) -> "Segmenter":
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
    ctx = FitContext(
        config=config,
        params=params,
        backbone=net,
        features=features,
        dataset=train_data,
        num_classes=getattr(train_data, "num_classes", None),
        dist=dist,
        checkpoint_dir=out / rundir.CHECKPOINTS,
        log=log,
    )
    tic = time.perf_counter()
    state = impl.fit(ctx)
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
                **({"fit_record": ctx.record} if ctx.record else {}),
            },
        )
        log(f"fit finished in {elapsed:.1f} s; run written to {out}")
    dist.barrier()
    return Segmenter.from_run(rundir.load(out), backbone=net, resolved=(impl, params))


def plan(
    config: RunConfig, *, cache_dir: str | os.PathLike | None = None, throughput: float | None = None
) -> list[str]:
    """What ``fit`` with ``config`` would do, as lines of text; builds no backbone (no weights needed),
    extracts nothing and writes nothing. ``throughput`` (training items per second, e.g. measured by
    benchmarks/bench_paper_scale.py or gpu_check.sh on the target machine) gives a time estimate."""
    from ..backbones import get_spec
    from ..features.cache import default_cache_dir
    from ..features.pipeline import resolve_workers
    from ..features.source import choose_source, estimate_size, gb, has_labels, token_shapes

    spec = get_spec(config.backbone.name)
    train_data = build_train_dataset(config)
    n = len(train_data)
    base = getattr(train_data, "source", train_data)
    crops = (
        f"{len(base):,} images x {train_data.per_image} {config.data.crop} crops"
        if isinstance(train_data, CropView)
        else f"{n:,} images"
    )
    impl, params = resolve_method(config)
    labelled = has_labels(train_data)
    folder = Path(cache_dir or config.cache_dir or default_cache_dir())
    lines = [
        f"fit {config.method} on {getattr(train_data, 'name', '?')}: {n:,} training items ({crops})",
        f"backbone {spec.name}: {spec.dim} channels, stride {spec.stride}; batch of {config.batch_size} per forward; "
        f"{resolve_workers(config.data.workers)} decode workers",
    ]
    fplan = impl.plan(params, config.clusters, n, spec.dim, 0)
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
        lines.append(
            f"  source: {'stream (backbone on every batch)' if verdict == 'stream' else 'cache'}: {reason}{caveat}"
        )
    fplan = impl.plan(params, config.clusters, n, spec.dim, tokens)
    for stage in fplan.stages:
        lines.append(
            f"stage {stage.name}: {stage.steps_per_epoch:,} steps per epoch, {stage.total_steps:,} steps in total, "
            f"{stage.images_per_step} items per step ({stage.total_steps * stage.images_per_step:,} item reads)"
        )
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
