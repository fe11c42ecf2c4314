"""CAUSE, "Causal Unsupervised Semantic Segmentation" (Kim, Lee, Ro; arXiv 2310.07379), MLP and TR
heads (methods ``cause-mlp`` and ``cause-tr``), as specified in docs/methods/cause.md.

``losses`` (pure functions), ``heads`` (modules), ``bank`` (the concept ring buffer), ``trainer``
(Steps 1-3 on the shared engine) and ``predictor`` (test time).
"""

from .params import Params
from .predictor import build_predictor
from .trainer import fit, plan

MIN_CLUSTERS = 2   # Step 3's centroids are drawn in (-1/K, 1/K), and one cluster segments nothing

# the supervised monitoring probe on the teacher head's output (scored by `evaluate --probe linear`)
LINEAR_PROBE = ("linear.weight", "linear.bias")

__all__ = ["LINEAR_PROBE", "MIN_CLUSTERS", "Params", "build_predictor", "fit", "plan"]
