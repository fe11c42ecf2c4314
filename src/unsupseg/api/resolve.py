"""Run configs: defaults, presets, config files and overrides resolved into one ``RunConfig``; the
training data and preprocessing a config names."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._io import check_writable_dir
from ..config import (
    RunConfig,
    apply_overrides,
    check_clusters,
    from_dict,
    has_preset,
    load_preset,
    merge,
    to_dict,
)
from ..data import CroppedDataset, CropView, ImageFolder, Preprocess, build_dataset
from ..errors import ConfigError
from ..methods import get_method
from ..methods.base import Method


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
    return resolve_run(method, preset=preset, config_file=config_file, overrides=overrides, **fields)[0]


def resolve_run(
    method: str | None = None,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    **fields,
) -> tuple[RunConfig, Method, Any]:
    """``resolve_config``, with the method and its typed Params it resolved on the way."""
    data: dict = {}
    if config_file is not None:
        from ..config import load_yaml

        data = load_yaml(config_file)
        if method and data.get("method") and data.get("params") and method != data["method"]:
            raise ConfigError(f"{config_file} is a {data['method']} config: its params do not fit --method {method}; "
                              f"drop --method, or leave out --config and start from a {method} preset")
    name = method or data.get("method") or "kmeans"
    impl = get_method(name)
    dataset = fields.get("data.dataset") or data.get("data", {}).get("dataset")
    if preset is None:
        if dataset and has_preset(name, dataset):
            preset = dataset
        elif has_preset(name, "default"):
            preset = "default"
    base = load_preset(name, preset) if preset else {}
    merged = merge(merge(base, data), {"method": name})
    explicit = [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    merged = apply_overrides(merged, explicit + list(overrides))
    config = from_dict(RunConfig, merged)
    check_clusters(config.clusters, impl.MIN_CLUSTERS)
    # the method's own dataclass checks the params section (unknown keys name the closest one)
    params = impl.parse_params(config.params)
    config.params = to_dict(params)
    _check_auto_clusters(config)
    return config, impl, params


def min_clusters(method: str) -> int:
    return get_method(method).MIN_CLUSTERS


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
    from ..features.cache import default_cache_dir

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
    from ..features.cluster_count import estimate_clusters

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


def resolve_method(config: RunConfig) -> tuple[Method, Any]:
    """The method a config names and its typed Params."""
    method = get_method(config.method)
    return method, method.parse_params(config.params)


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




def fit_run(
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
) -> tuple[RunConfig, Method, Any]:
    """The resolved config of a ``fit`` call with these arguments, its method and typed Params."""
    return resolve_run(
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


def fit_config(method: str | None = None, **arguments) -> RunConfig:
    """The resolved config of a ``fit`` call with these (keyword) arguments."""
    return fit_run(method, **arguments)[0]
