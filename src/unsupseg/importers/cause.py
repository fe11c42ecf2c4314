"""Import the published CAUSE models (docs/checkpoints.md) into a run directory.

``segment_{mlp|tr}.pth`` (student, teacher ``head_ema``, projections, linear probe; 1x1 convolutions
as 4-d weights), ``cluster_{mlp|tr}.pth`` (``codebook`` K x D, ``cluster_probe`` C x r) and,
optionally, ``modular.npy`` (the same K x D clusterbook) become a run whose predictions follow the
reference's test path: backbone tokens -> ``head_ema`` -> flip average -> bilinear upsampling ->
cosine to ``cluster_probe`` -> argmax (CRF on log_softmax(3 cos) when enabled). Cluster ids are the
rows of ``cluster_probe``. Files are read with ``torch.load(weights_only=True)`` / ``np.load``
without pickles; anything malformed is a CheckpointError naming the file and the key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import rundir
from .._io import torch_load_plain
from ..backbones import build_backbone
from ..config import BackboneConfig, DataConfig, RunConfig, TestConfig, from_dict, load_preset, to_dict
from ..errors import CheckpointError, ConfigError
from ..methods.cause import Params
from ..methods.cause.predictor import HEAD, head_from_state

# the reference's 1x1 convolutions, stored (out, in, 1, 1); ours are linears (out, in)
_CONV_SUFFIXES = ("f1.weight", "f2.0.weight", "f2.2.weight")


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    data = torch_load_plain(path, CheckpointError)
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{path} must hold a plain state dict of tensors (the published CAUSE layout)")
    return data


def _matrix(data: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in data:
        raise CheckpointError(f"{path} has no {key!r} key (expected in a published cluster_*.pth)")
    value = data[key]
    if value.ndim != 2 or not value.is_floating_point():
        raise CheckpointError(f"{path}: {key!r} must be a 2-d float matrix, got shape {tuple(value.shape)}")
    return value.float()


def _head(data: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    head = {}
    for key, value in data.items():
        if not key.startswith(HEAD):
            continue
        name = key[len(HEAD):]
        if name.endswith(_CONV_SUFFIXES) and value.ndim == 4:
            if tuple(value.shape[2:]) != (1, 1):
                raise CheckpointError(f"{path}: {key!r} must be a 1x1 convolution, got shape {tuple(value.shape)}")
            value = value[:, :, 0, 0]
        head[name] = value.float()
    if not head:
        raise CheckpointError(f"{path} has no {HEAD}* keys (the teacher head used at test time)")
    return head


def import_cause(
    method: str,
    segment: Path,
    cluster: Path,
    backbone: str,
    out: Path,
    *,
    backbone_weights: str | None = None,
    modular: Path | None = None,
    backbone_options: dict | None = None,
) -> Path:
    """Write a ``method`` (cause-mlp | cause-tr) run directory at ``out`` from the published CAUSE files;
    returns ``out``.

    ``backbone`` names the backbone the files were trained on (e.g. ``dino_vits8``), its weights
    found as for ``fit`` or given by ``backbone_weights``; ``backbone_options`` e.g.
    ``{"num_heads": 12}`` reproduces the reference's 12-head DINO ViT-S (docs/methods/cause.md §7.3).
    TR runs get the test resolution of their query table (N_q = (R / p)²); other image shapes
    are covered by tiling windows of that size.
    """
    if method not in ("cause-mlp", "cause-tr"):
        raise ConfigError(f"the CAUSE methods are cause-mlp and cause-tr, got {method!r}")
    segment, cluster, out = Path(segment), Path(cluster), Path(out)
    head = _head(_load(segment), segment)
    clusters = _load(cluster)
    codebook = _matrix(clusters, "codebook", cluster)
    centroids = _matrix(clusters, "cluster_probe", cluster)
    if modular is not None:
        codebook = _modular(Path(modular), codebook)
    tr = "query_pos" in head
    if tr != (method == "cause-tr"):
        raise CheckpointError(
            f"{segment} holds a CAUSE-{'TR' if tr else 'MLP'} head ({'with' if tr else 'without'} "
            f"'{HEAD}query_pos'), not the {method} head asked for"
        )
    net = build_backbone(backbone, backbone_weights or "auto", **(backbone_options or {}))
    f1 = head.get("tr.f1.weight" if tr else "f1.weight")
    if f1 is not None and f1.shape[1] != net.dim:
        raise CheckpointError(
            f"{segment}: the head expects {f1.shape[1]}-d tokens but backbone {backbone!r} gives {net.dim}"
        )
    if codebook.shape[1] != net.dim:
        raise CheckpointError(
            f"{cluster}: 'codebook' has {codebook.shape[1]} columns, backbone {backbone!r} gives {net.dim}-d tokens"
        )
    state = {f"{HEAD}{k}": v for k, v in head.items()}
    state.update(codebook=codebook, cluster_probe=centroids)
    if tr:
        queries = head["query_pos"].shape[0]
        side = math.isqrt(queries)
        if side * side != queries:
            raise CheckpointError(f"{segment}: {HEAD}query_pos has {queries} rows, not a square token grid")
        state["grid"] = torch.tensor([side, side])
        resolution = side * net.stride
    else:
        resolution = 322 if net.stride == 14 else 320  # docs/methods/cause.md §1.3 test resolutions
    reference = head_from_state(state, Params(), source=str(segment))  # strict load: shapes and keys
    if centroids.shape[1] != (reference.tr.f1 if tr else reference.f1).out_features:
        raise CheckpointError(
            f"{cluster}: 'cluster_probe' rows must have the head's output size, got {tuple(centroids.shape)}"
        )

    config = _run_config(method, head, codebook, centroids, resolution, backbone, backbone_weights, backbone_options)
    rundir.prepare(out, config, overwrite=False)
    rundir.save(out, config, state, {
        "backbone": net.name,
        "backbone_weights_id": net.weights_id,
        "imported_from": {"segment": os.fspath(segment.resolve()), "cluster": os.fspath(cluster.resolve()),
                          "modular": os.fspath(Path(modular).resolve()) if modular is not None else None},
    })
    return out


def _run_config(method: str, head: dict[str, Tensor], codebook: Tensor, centroids: Tensor, resolution: int,
                backbone: str, backbone_weights: str | None, backbone_options: dict | None) -> RunConfig:
    """The imported run's config: the method's default params with the files' sizes, the reference's
    test recipe at ``resolution``."""
    params = from_dict(Params, load_preset(method, "default").get("params", {}), "params")
    params.concepts, params.reduced_dim = codebook.shape[0], centroids.shape[1]
    if "query_pos" in head:
        params.tr_ffn_dim = head["tr.linear1.weight"].shape[0]
    weights = backbone_weights or "auto"
    if weights not in ("auto", "random"):
        weights = str(Path(weights).resolve())
    return RunConfig(
        method=method,
        clusters=centroids.shape[0],
        backbone=BackboneConfig(name=backbone, weights=weights, options=dict(backbone_options or {})),
        data=DataConfig(resolution=resolution),
        test=TestConfig(resolution=resolution, flip=True, crf=True, alpha=3.0),
        params=to_dict(params),
    )


def _modular(path: Path, codebook: Tensor) -> Tensor:
    """``modular.npy``: must agree in shape with the codebook of the cluster file; it is used as M."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.dtype.kind != "f" or tuple(array.shape) != tuple(codebook.shape):
        raise CheckpointError(
            f"{path}: expected a float K x D clusterbook of shape {tuple(codebook.shape)} "
            f"(as the cluster file's 'codebook'), got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(array.astype(np.float32))
