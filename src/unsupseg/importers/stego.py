"""Import a released STEGO checkpoint (``cocostuff27_vit_base_5.ckpt``, ``cityscapes_vit_base_1.ckpt``,
``potsdam_test.ckpt``) into a self-contained run directory.

The files are PyTorch Lightning checkpoints: a pickle holding the ``state_dict`` (the whole model:
DINO ViT under ``net.model.*``, head ``net.cluster1/2``, ``cluster_probe.clusters``, ``linear_probe``)
and ``hyper_parameters`` whose ``cfg`` is an OmegaConf DictConfig. Nothing in them is unpickled
freely: the file is first scanned for the globals it names (without running anything) and refused
with CheckpointError if any is outside a fixed allow-list, then read with
``torch.load(weights_only=True)`` allowing exactly these globals. The OmegaConf classes are mapped
to local stand-ins that only record their pickled state, which is then turned into plain dicts and
lists, so omegaconf need not be installed.

The run directory gets ``backbone.safetensors`` (the ViT, DINO key names), the head and both probes
in ``weights.safetensors``, and a config whose test recipe is the reference evaluation: flip
averaging of the code, log_softmax(2 * cosine), dense CRF. Cluster ids are the row order of
``cluster_probe.clusters``.
"""

from __future__ import annotations

import hashlib
import pickle
import typing
import zipfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import rundir
from .._io import atomic_path, torch_load_plain
from ..backbones import build_backbone
from ..config import RunConfig, from_dict, has_preset, load_preset, merge, to_dict
from ..errors import CheckpointError, RunDirError, UnsupsegError
from ..methods import stego

__all__ = ["import_stego", "read_lightning_checkpoint"]

BACKBONE_FILE = "backbone.safetensors"


class _Pickled:
    """Stand-in for a pickled class: keeps the state it is built with and nothing else."""

    def __setstate__(self, state) -> None:
        self.pickled_state = state


class _DictConfig(_Pickled):
    pass


class _ListConfig(_Pickled):
    pass


class _Node(_Pickled):
    pass


class _Metadata(_Pickled):
    pass


class _CallbackKey(_Pickled):
    """Lightning < 1.5 keys callback states by the callback class itself."""


_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode")

# Everything a Lightning + OmegaConf checkpoint pickles besides what torch allows by default (tensors,
# storages, OrderedDict): OmegaConf containers, nodes and metadata, the type annotations their
# metadata holds, the defaultdict of its resolver cache, and Lightning 1.4's callback-state key.
ALLOWED_GLOBALS: list[tuple[object, str]] = [
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_Metadata, "omegaconf.base.ContainerMetadata"),
    (_Metadata, "omegaconf.base.Metadata"),
    *[(_Node, f"omegaconf.nodes.{name}") for name in _OMEGACONF_NODES],
    (typing.Any, "typing.Any"),
    (typing.Dict, "typing.Dict"),
    (typing.List, "typing.List"),
    (dict, "builtins.dict"),
    (list, "builtins.list"),
    (int, "builtins.int"),
    (float, "builtins.float"),
    (str, "builtins.str"),
    (bool, "builtins.bool"),
    (defaultdict, "collections.defaultdict"),
    (_CallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _plain(obj):
    """OmegaConf stand-ins -> plain dicts / lists / values (recursively)."""
    if isinstance(obj, (_DictConfig, _ListConfig)):
        return _plain(obj.pickled_state.get("_content"))
    if isinstance(obj, _Node):
        return _plain(obj.pickled_state.get("_val"))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_lightning_checkpoint(path: str | Path) -> dict:
    """The content of a Lightning checkpoint, read safely; OmegaConf configs come back as plain dicts.

    Raises CheckpointError naming the file (and the offending global) for anything else than a
    torch zip checkpoint whose pickle only names allow-listed globals.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save zip format expected)")
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        try:
            # a static scan of the pickle's GLOBAL opcodes: nothing is constructed or called
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
    if unsafe:
        raise CheckpointError(
            f"refusing to load {path}: the file holds code or objects outside the STEGO checkpoint format "
            f"({', '.join(sorted(unsafe))}); unsupseg never unpickles arbitrary objects, so it is refused"
        )
    content = torch_load_plain(path, CheckpointError, allowed=tuple(ALLOWED_GLOBALS))
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a Lightning checkpoint dict")
    return _plain(content)


def _cfg_value(cfg: dict, key: str, default=None):
    """A training-config value; later reference versions nest the training keys under ``train``."""
    if key in cfg:
        return cfg[key]
    nested = cfg.get("train")
    if isinstance(nested, dict) and key in nested:
        return nested[key]
    return default


# reference dataset_name -> our benchmark name (and preset)
_DATASETS = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3"}

# Params field <- reference config key
_PARAM_KEYS = {
    "dim": "dim", "projection": "projection_type", "steps": "max_steps", "batch_size": "batch_size", "lr": "lr",
    "feature_samples": "feature_samples", "neg_samples": "neg_samples", "knn_k": "num_neighbors",
    "pointwise": "pointwise", "zero_clamp": "zero_clamp", "stabilize": "stabalize",
    "signal_dropout": "dropout", "correspondence_weight": "correspondence_weight", "rec_weight": "rec_weight",
    "weight_self": "pos_intra_weight", "weight_knn": "pos_inter_weight", "weight_rand": "neg_inter_weight",
    "shift_self": "pos_intra_shift", "shift_knn": "pos_inter_shift", "shift_rand": "neg_inter_shift",
}


def _run_config(cfg: dict, clusters: int, backbone: str, weights: Path, source: Path) -> RunConfig:
    dataset = _DATASETS.get(str(_cfg_value(cfg, "dataset_name", "")))
    base = load_preset("stego", dataset if dataset and has_preset("stego", dataset) else "default")
    params = dict(base.get("params", {}))
    for field, key in _PARAM_KEYS.items():
        value = _cfg_value(cfg, key)
        if value is not None:
            params[field] = value
    if params.get("projection") not in ("linear", "nonlinear"):
        raise CheckpointError(f"{source}: projection_type {params.get('projection')!r} is not linear or nonlinear")
    res = _cfg_value(cfg, "res", 224)
    merged = merge(base, {
        "method": "stego",
        "clusters": clusters,
        "backbone": {"name": backbone, "weights": str(weights)},
        "data": {"dataset": dataset, "resolution": res, "mode": "short_crop", "interpolation": "nearest"},
        "test": {"resolution": 320, "flip": True, "crf": True, "alpha": 2.0},
        "params": params,
    })
    try:
        config = from_dict(RunConfig, merged)
        config.params = to_dict(from_dict(stego.Params, config.params, "params"))
    except UnsupsegError as err:
        raise CheckpointError(f"{source}: its training configuration does not map onto STEGO's: {err}") from None
    return config


def _tensor(state: dict, key: str, source: Path) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source} lacks {key!r} in its state_dict: not a STEGO checkpoint?")
    return value


def import_stego(ckpt: Path, out: Path, *, backbone_weights: str | None = None) -> Path:
    """Write the run directory ``out`` for the released STEGO checkpoint ``ckpt``; returns ``out``.

    ``backbone_weights``: a DINO weights file to use instead of the ViT stored in the checkpoint
    (the released files all carry theirs, so this is rarely needed).
    """
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} already exists and is not empty; choose another --out")
    content = read_lightning_checkpoint(ckpt)
    state, hparams = content.get("state_dict"), content.get("hyper_parameters")
    if not isinstance(state, dict) or not isinstance(hparams, dict) or not isinstance(hparams.get("cfg"), dict):
        raise CheckpointError(f"{ckpt} is not a STEGO Lightning checkpoint (state_dict / hyper_parameters.cfg missing)")
    cfg = hparams["cfg"]
    model_type, patch = _cfg_value(cfg, "model_type"), _cfg_value(cfg, "dino_patch_size")
    sizes = {"vit_small": "s", "vit_base": "b"}
    if model_type not in sizes or patch not in (8, 16):
        raise CheckpointError(f"{ckpt}: unsupported backbone model_type={model_type!r} dino_patch_size={patch!r}")
    backbone_name = f"dino_vit{sizes[model_type]}{patch}"

    new = {
        "head.cluster1.0.weight": _tensor(state, "net.cluster1.0.weight", ckpt),
        "head.cluster1.0.bias": _tensor(state, "net.cluster1.0.bias", ckpt),
        "cluster_probe": _tensor(state, "cluster_probe.clusters", ckpt),
    }
    if "net.cluster2.0.weight" in state:
        for part in ("0.weight", "0.bias", "2.weight", "2.bias"):
            new[f"head.cluster2.{part}"] = _tensor(state, f"net.cluster2.{part}", ckpt)
    if "linear_probe.weight" in state:
        new["linear_probe.weight"] = _tensor(state, "linear_probe.weight", ckpt)
        new["linear_probe.bias"] = _tensor(state, "linear_probe.bias", ckpt)
    dim = int(new["head.cluster1.0.weight"].shape[0])
    if _cfg_value(cfg, "dim") not in (None, dim):
        raise CheckpointError(f"{ckpt}: cfg.dim={_cfg_value(cfg, 'dim')} but the head has {dim} channels")
    if new["cluster_probe"].ndim != 2 or new["cluster_probe"].shape[1] != dim:
        raise CheckpointError(
            f"{ckpt}: cluster_probe.clusters has shape {tuple(new['cluster_probe'].shape)}, expected K x {dim}"
        )
    clusters = int(new["cluster_probe"].shape[0])

    out.mkdir(parents=True, exist_ok=True)
    if backbone_weights is None:
        vit = {k[len("net.model."):]: v.contiguous() for k, v in state.items() if k.startswith("net.model.")}
        if not vit:
            raise CheckpointError(f"{ckpt} carries no backbone (net.model.*); pass --backbone-weights FILE")
        weights_path = (out / BACKBONE_FILE).resolve()
        with atomic_path(weights_path) as tmp:
            save_file(vit, str(tmp), metadata={"source": ckpt.name})
    else:
        weights_path = Path(backbone_weights).resolve()
    # builds (and strictly checks) the ViT once, for its weights checksum
    net = build_backbone(backbone_name, str(weights_path))
    if net.dim != new["head.cluster1.0.weight"].shape[1]:
        raise CheckpointError(
            f"{ckpt}: head expects {new['head.cluster1.0.weight'].shape[1]}-dim features, {backbone_name} gives "
            f"{net.dim}"
        )

    config = _run_config(cfg, clusters, backbone_name, weights_path, ckpt)
    digest = hashlib.sha256()
    with open(ckpt, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    rundir.save(out, config, new, {
        "backbone": net.name,
        "backbone_weights_id": net.weights_id,
        "imported_from": {"file": str(ckpt.resolve()), "sha256": digest.hexdigest(),
                          "n_classes": hparams.get("n_classes"), "dataset_name": _cfg_value(cfg, "dataset_name")},
    })
    return out
