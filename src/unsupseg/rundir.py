"""The run directory: everything needed to rebuild a trained segmenter, and nothing else.

``config.yaml``         the fully resolved RunConfig (versioned)
``weights.safetensors`` the method state
``meta.json``           package version, backbone and its weights checksum, dataset fingerprint,
                        sha256 of the weights file (tampering is detected on load), metrics when known
``checkpoints/``        training checkpoints while a fit is in progress (removed when it finishes)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import atomic_path, atomic_write_text
from .config import CONFIG_VERSION, RunConfig, dump_yaml, from_dict, load_yaml, to_dict
from .errors import ConfigError, RunDirError

CONFIG = "config.yaml"
WEIGHTS = "weights.safetensors"
META = "meta.json"
CHECKPOINTS = "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Run:
    path: Path
    config: RunConfig
    state: dict[str, torch.Tensor]
    meta: dict


def is_complete(path: Path) -> bool:
    return (path / WEIGHTS).exists() and (path / META).exists()


def prepare(path: Path, config: RunConfig, overwrite: bool) -> bool:
    """Make ``path`` ready for a fit of ``config``; returns True when an interrupted fit resumes.

    A finished run is never replaced unless ``overwrite``; an unfinished one resumes only when its
    config is the same.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif is_complete(path):
            raise RunDirError(f"{path} already holds a finished run; pass --overwrite to replace it or choose another --out")
        elif (path / CONFIG).exists():
            previous = load_yaml(path / CONFIG)
            if previous != to_dict(config):
                raise RunDirError(
                    f"{path} holds an unfinished run with a different configuration; "
                    "pass --overwrite to discard it or choose another --out"
                )
            return True
        else:
            raise RunDirError(f"{path} is not empty and is not a run directory; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / CONFIG, dump_yaml(to_dict(config)))
    return False


def save(path: Path, config: RunConfig, state: dict[str, torch.Tensor], meta: dict) -> None:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"unsupseg_version": __version__, "method": config.method})
    full_meta = {
        "unsupseg_version": __version__,
        "config_version": CONFIG_VERSION,
        "method": config.method,
        **meta,
        "weights_sha256": _sha256(path / WEIGHTS),
    }
    atomic_write_text(path / CONFIG, dump_yaml(to_dict(config)))
    atomic_write_text(path / META, json.dumps(full_meta, indent=2))
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)


def update_meta(path: Path, **fields) -> None:
    meta = json.loads((Path(path) / META).read_text())
    meta.update(fields)
    atomic_write_text(Path(path) / META, json.dumps(meta, indent=2))


def load(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    for name in (CONFIG, WEIGHTS, META):
        if not (path / name).exists():
            raise RunDirError(f"{path} is not a finished run: {name} is missing (is the fit still running or interrupted?)")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path / META} is not valid JSON: {err}") from None
    if meta.get("config_version") != CONFIG_VERSION:
        raise RunDirError(
            f"{path} was written by unsupseg {meta.get('unsupseg_version', '?')} with config format "
            f"{meta.get('config_version')!r}; this is unsupseg {__version__} (format {CONFIG_VERSION}). "
            "Re-run the fit with this version."
        )
    if _sha256(path / WEIGHTS) != meta.get("weights_sha256"):
        raise RunDirError(f"{path / WEIGHTS} does not match the checksum recorded in {META}: the file was modified or damaged")
    try:
        config = from_dict(RunConfig, load_yaml(path / CONFIG))
    except ConfigError as err:
        raise RunDirError(f"{path / CONFIG}: {err}") from None
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise RunDirError(f"{path / WEIGHTS} cannot be read: {err}") from None
    return Run(path, config, state, meta)
