"""Leopart registered as a method: the functions of the ``leopart`` package behind the ``Method``
contract. A run fitted with ``params.protocol=reference`` is scored by the reference's own protocol
(``evaluation_protocol``)."""

from __future__ import annotations

from torch import Tensor

from ..base import FitContext, FitPlan, Method, Predictor, PredictorInfo
from ..registry import register_method
from . import MIN_CLUSTERS, Params, build_predictor, fit, plan

# the name the evaluating layer scores a reference-protocol run by (label maps per Infomap seed)
REFERENCE_PROTOCOL = "leopart-reference"


@register_method
class Leopart(Method):
    name = "leopart"
    Params = Params
    MIN_CLUSTERS = MIN_CLUSTERS

    def fit(self, ctx: FitContext) -> dict[str, Tensor]:
        return fit(ctx)

    def build_predictor(self, params: Params, state: dict[str, Tensor], info: PredictorInfo) -> Predictor:
        return build_predictor(params, state, info)

    def plan(self, params: Params, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
        return plan(params, self.name, clusters, n_items, dim, tokens)

    def evaluation_protocol(self, params: Params) -> str | None:
        return REFERENCE_PROTOCOL if params.protocol == "reference" else None
