"""The run directory: everything needed to rebuild a trained segmenter, and nothing else.

``config.yaml``         the fully resolved RunConfig (versioned)
``weights.safetensors`` the method state
``meta.json``           package version, backbone and its weights checksum, dataset fingerprint,
                        sha256 of the weights file and of config.yaml (tampering is detected on load),
                        metrics when known
``checkpoints/``        training checkpoints while a fit is in progress (removed when it finishes)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import atomic_path, atomic_write_text, held_lock
from .config import CONFIG_VERSION, RunConfig, dump_yaml, from_dict, load_yaml, to_dict
from .errors import ConfigError, OutputError, RunDirError

CONFIG = "config.yaml"
WEIGHTS = "weights.safetensors"
META = "meta.json"
CHECKPOINTS = "checkpoints"
LOCK = ".unsupseg-fit.lock"   # held while a fit writes the folder; removed when it ends


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


# What a fit or an import writes into a run directory. `--overwrite` deletes these (and their
# temporary files) and nothing else; any other file in the folder is left as it is.
OWN_FILES = (CONFIG, WEIGHTS, META, "backbone.safetensors")


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a run of unsupseg: its config.yaml (the first file every fit writes)
    is a run config, with the ``version`` and ``method`` keys no other file of that name is likely to have."""
    try:
        data = load_yaml(Path(path) / CONFIG)
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    return {"version", "method", "backbone", "data", "params"} <= data.keys()


def _holds_files(path: Path) -> bool:
    return any(p.name != LOCK for p in path.iterdir())


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Hold the run directory ``path`` (made if missing) for one fit; a second fit into it meanwhile is
    refused, naming the first's process (``_io.held_lock``). On the way out the lock file goes, and the folder
    too when this call made it and nothing else was written into it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a folder; choose another --out")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK

    def refuse(fd: int) -> None:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        raise RunDirError(f"{path} is being written by another fit (process {holder or 'unknown'}); wait for it to "
                          "finish or choose another --out")

    try:
        with held_lock(lock, refuse) as fd:
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:   # a full disk: the lock holds all the same, only the message loses the PID
                pass
            yield
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def has_checkpoints(path: Path) -> bool:
    folder = Path(path) / CHECKPOINTS
    return folder.is_dir() and any(folder.iterdir())


def discard(path: Path) -> None:
    """Delete the run's own files in ``path`` (see OWN_FILES, the checkpoints) and nothing else."""
    path = Path(path)
    for name in OWN_FILES:
        (path / name).unlink(missing_ok=True)
        for tmp in path.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)


def prepare(path: Path, config: RunConfig, overwrite: bool) -> bool:
    """Make ``path`` ready for a fit of ``config``; returns True when an interrupted fit resumes.

    A finished run is never replaced unless ``overwrite``; an unfinished one resumes only when its
    config is the same, and is replaced when it stopped before its first checkpoint (nothing to lose).
    A non-empty folder that is not a run directory is never touched, ``overwrite`` or not.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a folder; choose another --out")
    if path.is_dir() and _holds_files(path):
        if not is_run_dir(path):
            raise RunDirError(
                f"{path} is not empty and is not a run directory (no unsupseg {CONFIG}); --overwrite only "
                "replaces run directories, so nothing was deleted: choose another --out"
            )
        if overwrite:
            discard(path)
        elif is_complete(path):
            raise RunDirError(
                f"{path} already holds a finished run; pass --overwrite to replace it or choose another --out"
            )
        elif load_yaml(path / CONFIG) == to_dict(config):
            return True
        elif has_checkpoints(path):
            raise RunDirError(
                f"{path} holds an unfinished run with a different configuration; "
                "pass --overwrite to discard it or choose another --out"
            )
        else:
            # an earlier fit stopped before its first checkpoint: only its config is there
            discard(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / CONFIG, dump_yaml(to_dict(config)))
    except (OSError, OutputError) as err:
        if created and path.is_dir() and not _holds_files(path):   # a full disk leaves no empty run folder
            path.rmdir()
        if isinstance(err, OutputError):
            raise
        raise OutputError(f"cannot write the run directory {path}: {err.strerror or err}") from None
    return False


def abandon(path: Path) -> None:
    """After a fit failed: remove what it wrote when no checkpoint is there to resume from (the folder
    itself goes with the lock of ``writing`` when that made it)."""
    path = Path(path)
    if not path.is_dir() or has_checkpoints(path) or is_complete(path):
        return
    discard(path)


def save(path: Path, config: RunConfig, state: dict[str, torch.Tensor], meta: dict) -> None:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"unsupseg_version": __version__, "method": config.method})
    atomic_write_text(path / CONFIG, dump_yaml(to_dict(config)))
    full_meta = {
        "unsupseg_version": __version__,
        "config_version": CONFIG_VERSION,
        "method": config.method,
        **meta,
        "weights_sha256": _sha256(path / WEIGHTS),
        "config_sha256": _sha256(path / CONFIG),
    }
    atomic_write_text(path / META, json.dumps(full_meta, indent=2))
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)


def update_meta(path: Path, **fields) -> None:
    meta = json.loads((Path(path) / META).read_text())
    meta.update(fields)
    atomic_write_text(Path(path) / META, json.dumps(meta, indent=2))


def load(path: str | Path) -> Run:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory (give the folder that holds {CONFIG} and {WEIGHTS})")
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    for name in (CONFIG, WEIGHTS, META):
        if not (path / name).exists():
            raise RunDirError(
                f"{path} is not a finished run: {name} is missing (is the fit still running or interrupted?)"
            )
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
        raise RunDirError(
            f"{path / WEIGHTS} does not match the checksum recorded in {META}: the file was modified or damaged"
        )
    # runs written before config.yaml had a checksum carry none
    if "config_sha256" in meta and _sha256(path / CONFIG) != meta["config_sha256"]:
        raise RunDirError(f"{path / CONFIG} does not match the checksum recorded in {META}: it was edited after the "
                          "fit, and the weights hold the values it had then; fit again to change clusters or settings")
    try:
        config = from_dict(RunConfig, load_yaml(path / CONFIG))
    except ConfigError as err:
        raise RunDirError(f"{path / CONFIG}: {err}") from None
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise RunDirError(f"{path / WEIGHTS} cannot be read: {err}") from None
    return Run(path, config, state, meta)
