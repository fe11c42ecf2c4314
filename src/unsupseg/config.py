"""Typed dataclass configs, YAML presets and ``--set a.b=value`` overrides.

Configs are plain dataclasses. ``from_dict`` checks every key and type and raises ConfigError naming
the bad key (and the closest valid one) or value; ``to_dict`` gives back plain YAML-able data.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

CONFIG_VERSION = 1
CROP_KINDS = ("none", "five", "double", "super")

# Input sides above this are refused: features and scores of one 2048-px image already take gigabytes.
MAX_RESOLUTION = 2048


def check_clusters(value: Any, minimum: int = 1, tokens: int | None = None, where: str = "clusters") -> int | str:
    """The number of clusters K, checked in one place: "auto" (estimated at fit time from the training
    features), or an integer >= ``minimum`` and, when the number of training tokens is known, at most
    that many (each cluster needs a token to start from)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer or auto, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where} must be at least {minimum}, got {value}")
    if tokens is not None and value > tokens:
        raise ConfigError(
            f"{where}={value} is more than the {tokens} training tokens (feature-map positions) to cluster; "
            "lower --clusters, or train on more images or at a higher data.resolution"
        )
    return value


def _check_resolution(value: Any, where: str) -> None:
    if value is not None and not 1 <= value <= MAX_RESOLUTION:
        raise ConfigError(f"{where} must be between 1 and {MAX_RESOLUTION} pixels, got {value}")


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str = "auto"          # "auto", "random", or a path to a weights file
    options: dict = field(default_factory=dict)   # extra build options, e.g. {"num_heads": 12}


@dataclass
class DataConfig:
    dataset: str | None = None     # benchmark name (camvid, cocostuff27, ...); None with `images`
    root: str | None = None
    split: str = "train"
    images: str | None = None      # an unlabelled image folder instead of a benchmark
    crops: str | None = None       # a folder written by `prepare-crops` to train on instead
    crop: str = "none"             # none | five | double | super: training crops cut on the fly
    resolution: int = 320          # training input: shorter side (or square side) in pixels
    mode: str = "short"            # short | short_crop | square | none
    interpolation: str = "bilinear"
    strict: bool = False           # unreadable images are errors instead of skipped
    cache: str = "auto"            # auto | always | never: cache the training features or stream them
    cache_max_gb: float = 100.0    # auto caches an entry only up to this size (and the free disk)
    workers: int | None = None     # decode/resize processes; None: from the CPU count

    def __post_init__(self) -> None:
        _check_resolution(self.resolution, "data.resolution")
        if self.crop not in CROP_KINDS:
            raise ConfigError(f"data.crop must be one of {', '.join(CROP_KINDS)}, got {self.crop!r}")


@dataclass
class TestConfig:
    resolution: int | None = None  # None: the training resolution
    interpolation: str | None = None  # image resize of evaluate; None: the dataset's protocol (labels: nearest)
    flip: bool = True              # horizontal flip averaging
    crf: bool = False              # dense CRF on by default where the method's spec uses it
    alpha: float = 3.0             # CRF unary = log_softmax(alpha * cosine scores)
    tile: bool = True              # fixed-size heads: cover other shapes by tiling

    def __post_init__(self) -> None:
        _check_resolution(self.resolution, "test.resolution")
        if not self.alpha > 0:
            raise ConfigError(f"test.alpha must be positive, got {self.alpha}")


@dataclass
class RunConfig:
    version: int = CONFIG_VERSION
    method: str = "kmeans"
    seed: int = 0
    clusters: int | Literal["auto"] = 27   # a number, or "auto": estimated from the training features
    clusters_range: list[int] = field(default_factory=lambda: [2, 40])   # K searched by "auto" (inclusive)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str = "auto"        # auto (bf16 autocast on CUDA, float32 on CPU) | bf16 | fp32
    batch_size: int = 8            # images per backbone forward (feature extraction, segment, evaluate)
    cache_dir: str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    test: TestConfig = field(default_factory=TestConfig)
    params: dict = field(default_factory=dict)   # method-specific, checked by the method's dataclass

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version!r} is not supported: this unsupseg writes and reads version "
                f"{CONFIG_VERSION}; fit again or set version: {CONFIG_VERSION} after checking the file"
            )
        check_clusters(self.clusters)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors) if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise ConfigError(f"{where}: expected {' or '.join(map(repr, typing.get_args(annotation)))}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:   # --set key=2,40 reads as a list
            value = [parse_value(v.strip()) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are ConfigErrors."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_value(text: str) -> Any:
    """A command-line value parsed as YAML (numbers, booleans, null, lists); plain text otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested mapping (in a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(text)
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: ``update`` wins; nested mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def preset_names(method: str) -> list[str]:
    root = resources.files("unsupseg") / "presets" / method
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def has_preset(method: str, name: str) -> bool:
    return name in preset_names(method)


def load_preset(method: str, name: str) -> dict:
    """The preset ``presets/<method>/<name>.yaml`` shipped with the package, or a YAML file path,
    fully expanded: a ``base: <method>/<preset>`` key names the preset it inherits from (its own keys
    replace the base's, mappings merged key by key)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        where, data = name, load_yaml(name)
    else:
        if not has_preset(method, name):
            raise ConfigError(
                f"unknown preset {name!r} for method {method!r}{_closest(name, preset_names(method) or ['(none)'])}")
        where = f"presets/{method}/{name}.yaml"
        data = yaml.safe_load((resources.files("unsupseg") / "presets" / method / f"{name}.yaml").read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or base.count("/") != 1:
        raise ConfigError(f"{where}: base must be <method>/<preset>, e.g. cause-tr/cocostuff27; got {base!r}")
    base_method, base_name = base.split("/")
    return merge(load_preset(base_method, base_name), data)
