"""CAUSE at test time (docs/methods/cause.md §5): embed = teacher head h_t, classify = cosine to the centroids Φ.

Run state (from ``fit`` or the importer): ``head_ema.*`` (the teacher head's state dict),
``cluster_probe`` (C x r), ``codebook`` (K x D), ``grid`` (TR only: the h, w token grid it was
trained on), and ``linear.weight/bias`` (supervised monitoring probe, unused for prediction).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import CheckpointError
from ..base import Predictor, PredictorInfo, cosine_scores
from .heads import MLPHead, TRHead
from .params import Params
from .trainer import to_map, to_tokens

HEAD = "head_ema."


def head_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(HEAD):]: v for k, v in state.items() if k.startswith(HEAD)}


def is_tr(state: dict[str, Tensor]) -> bool:
    return f"{HEAD}query_pos" in state


def head_from_state(state: dict[str, Tensor], params: Params, source: str = "the run state") -> nn.Module:
    """The teacher head rebuilt from ``state`` (dims read off the tensors), in eval mode; a missing,
    unexpected or wrongly shaped key is a CheckpointError naming it."""
    weights = head_state(state)
    try:
        if is_tr(state):
            f1, ffn = weights["tr.f1.weight"], weights["tr.linear1.weight"]
            head = TRHead(f1.shape[1], f1.shape[0], state["codebook"], weights["query_pos"].shape[0],
                          ffn.shape[0], params.tr_heads, params.dropout)
        else:
            f1 = weights["f1.weight"]
            head = MLPHead(f1.shape[1], f1.shape[0], params.dropout)
    except KeyError as err:
        name = err.args[0] if err.args[0] == "codebook" else HEAD + err.args[0]
        raise CheckpointError(f"{source} has no {name!r} (a CAUSE head needs it)") from None
    expected = head.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        names = [f"missing {HEAD}{k}" for k in missing] + [f"unexpected {HEAD}{k}" for k in unexpected]
        raise CheckpointError(
            f"{source} does not hold a CAUSE {'TR' if is_tr(state) else 'MLP'} head: {', '.join(names)}"
        )
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {HEAD}{key} has shape {tuple(weights[key].shape)}, expected {tuple(value.shape)}")
    head.load_state_dict(weights)
    return head.eval()


class CausePredictor(Predictor):
    def __init__(self, head: nn.Module, centroids: Tensor, grid: tuple[int, int] | None, feature_scale: float = 1.0):
        super().__init__()
        self.head = head
        self.register_buffer("centroids", centroids.float())
        self.fixed_grid = grid
        self.feature_scale = feature_scale

    def embed(self, features: Tensor) -> Tensor:
        return to_map(self.head(to_tokens(features * self.feature_scale)), tuple(features.shape[-2:]))

    def classify(self, embedding: Tensor) -> Tensor:
        return cosine_scores(embedding, self.centroids)


def build_predictor(params: Params, state: dict[str, Tensor], info: PredictorInfo) -> Predictor:
    if "cluster_probe" not in state:
        raise CheckpointError("the run state has no 'cluster_probe' (the CAUSE class centroids)")
    head = head_from_state(state, params)
    grid = tuple(int(v) for v in state["grid"]) if is_tr(state) else None
    return CausePredictor(head, state["cluster_probe"], grid, params.feature_scale)
