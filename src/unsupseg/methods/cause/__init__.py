"""CAUSE, "Causal Unsupervised Semantic Segmentation" (Kim, Lee, Ro; arXiv 2310.07379), MLP and TR
heads (methods ``cause-mlp`` and ``cause-tr``), as specified in docs/methods/cause.md.

``losses`` (pure functions), ``heads`` (modules), ``bank`` (the concept ring buffer), ``trainer``
(Steps 1-3 on the shared engine), ``predictor`` (test time) and ``method`` (the registered
``cause-mlp`` and ``cause-tr``).
"""

from .params import Params
from .predictor import build_predictor
from .trainer import fit, plan

__all__ = ["Params", "build_predictor", "fit", "plan"]
