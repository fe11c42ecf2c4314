"""CAUSE registered twice: ``cause-mlp`` and ``cause-tr`` share Params, trainer and predictor; the
method name picks the head."""

from __future__ import annotations

import torch

from ..base import FitContext, FitPlan, Method, Predictor, PredictorInfo
from ..registry import register_method
from .params import Params
from .predictor import build_predictor
from .trainer import fit, plan


class Cause(Method):
    Params = Params
    MIN_CLUSTERS = 2   # Step 3's centroids are drawn in (-1/K, 1/K), and one cluster segments nothing
    # the supervised monitoring probe on the teacher head's output (scored by `evaluate --probe linear`)
    LINEAR_PROBE = ("linear.weight", "linear.bias")

    def fit(self, ctx: FitContext) -> dict[str, torch.Tensor]:
        return fit(ctx)

    def build_predictor(self, params: Params, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
        return build_predictor(params, state, info)

    def plan(self, params: Params, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
        return plan(params, self.name, clusters, n_items, dim, tokens)


@register_method
class CauseMLP(Cause):
    name = "cause-mlp"


@register_method
class CauseTR(Cause):
    name = "cause-tr"
