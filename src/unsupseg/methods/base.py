"""What every method provides (``Method``), and what the shared fit machinery hands it (``FitContext``).

A method is a ``Method`` subclass registered under its name (``registry.register_method``); its
optional parts have declared defaults here. The Segmenter (api layer) does flip averaging, tiling,
upsampling, CRF and argmax around ``Predictor.embed`` and ``Predictor.classify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import RunConfig, from_dict
from ..engine import Dist


@dataclass
class FitContext:
    config: RunConfig
    params: Any                          # the method's Params instance (typed, resolved once per fit)
    backbone: nn.Module  # frozen Backbone
    features: Callable[..., Any]  # features(resolution=None, flip=False) -> FeatureStore or StreamSource (same reads)
    dataset: Any                         # the training SegDataset (images, labels when known)
    num_classes: int | None              # classes of the labelled data (linear probe only), else None
    dist: Dist
    checkpoint_dir: Path | None
    log: Callable[[str], None]
    # what the method states about how its fit ran (e.g. which library did a step): meta.json's
    # "fit_record", shown by evaluate and report
    record: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.config.seed * 1000 + offset)


@dataclass
class StagePlan:
    name: str
    steps_per_epoch: int
    total_steps: int
    images_per_step: int


@dataclass
class FitPlan:
    """What a fit will do, from the config and the number of training items alone (``fit --plan``).

    ``resolutions``: the training resolutions whose features the method reads (None: data.resolution);
    ``memory``: (what, bytes) of the large state it holds while training.
    """

    resolutions: list[int | None]
    stages: list[StagePlan]
    memory: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PredictorInfo:
    num_clusters: int
    feature_dim: int
    stride: int


class Predictor(nn.Module):
    """Per-pixel scores from backbone features, split in two so that flip averaging and upsampling
    happen on the embedding, as in the reference test-time paths.

    ``upsample_scores`` makes the Segmenter upsample the C score maps instead of the embedding (cheaper
    when the embedding is wide; the k-means baseline scores similarity maps this way). ``fixed_grid``
    is the token grid a
    head requires (TR heads), or None when any grid works.
    """

    fixed_grid: tuple[int, int] | None = None
    upsample_scores: bool = False

    def embed(self, features: torch.Tensor) -> torch.Tensor:   # B x D x h x w -> B x r x h x w
        raise NotImplementedError

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:  # B x r x H x W -> B x C x H x W
        raise NotImplementedError


def cosine_scores(embedding: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """cos(embedding[:, :, y, x], centroids[c]) as B x C x H x W."""
    emb = nn.functional.normalize(embedding, dim=1)
    cen = nn.functional.normalize(centroids, dim=1)
    return torch.einsum("brhw,cr->bchw", emb, cen)


class LinearProbe(Predictor):
    """A run's supervised linear probe: the method's embedding, then a 1x1 layer to class logits
    (``weight`` C x r, or a C x r x 1 x 1 convolution weight)."""

    def __init__(self, predictor: Predictor, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.inner = predictor
        self.fixed_grid = predictor.fixed_grid
        self.register_buffer("weight", weight.reshape(weight.shape[0], -1).float())
        self.register_buffer("bias", bias.float())

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(features)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.einsum("brhw,cr->bchw", embedding, self.weight) + self.bias[None, :, None, None]


class Method:
    """One segmentation method. Subclasses set ``name`` and ``Params`` and implement ``fit`` and
    ``build_predictor``; every other part has the default declared here.

    ``MIN_CLUSTERS``: the fewest clusters the method can produce. ``LINEAR_PROBE``: the (weight, bias)
    keys of the supervised linear probe in the run state, scored by ``evaluate --probe linear``, or
    None when the method trains none.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    MIN_CLUSTERS: ClassVar[int] = 1
    LINEAR_PROBE: ClassVar[tuple[str, str] | None] = None

    def parse_params(self, data: dict) -> Any:
        """The typed ``params:`` section of a run config (unknown keys name the closest one)."""
        return from_dict(self.Params, data, "params")

    def fit(self, ctx: FitContext) -> dict[str, torch.Tensor]:
        """Train and return the run state (tensors only, saved as safetensors)."""
        raise NotImplementedError

    def build_predictor(self, params: Any, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
        raise NotImplementedError

    def plan(self, params: Any, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
        """What ``fit`` will do (``fit --plan``); default: one pass over the features at data.resolution."""
        return FitPlan([None], [])

    def evaluation_protocol(self, params: Any) -> str | None:
        """The name of the evaluation protocol a run with these params is scored by instead of the
        generic one (the evaluating layer implements each name), or None."""
        return None
