"""Leopart's fully unsupervised segmentation: CBFE + foreground over-clustering + community detection
(docs/methods/leopart.md §2), on the frozen features of any backbone.

Fit, on the training features only:
1. standardise + PCA (``pca_dim``) of all tokens;
2. noisy foreground per image: CLS attention for ViTs, feature distinctiveness for CNNs
   (``saliency``; see ``saliency.py``), both through the reference's mass procedure;
3. CBFE: spherical k-means (``k_fg``), each cluster scored by its mean precision against the noisy
   foreground, clusters scoring at least tau are foreground. tau is label-free by default (Otsu on the
   cluster scores, or a fixed ``cbfe_threshold``); ``reference_threshold`` reproduces the reference's
   choice from ground-truth masks (needs labelled training data);
4. L2 k-means (``k_cd``) of the foreground tokens; background tokens get the extra label ``k_cd``;
5. co-occurrence of the labels at ``map_size`` x ``map_size`` (``graph: cooccurrence-similarity``: times
   the cosine of the two part centroids) -> graph (edge weight min(A_ij, A_ji) >= wt)
   -> Infomap (networkx Louvain when Infomap is not installed) -> label-to-community table.

Labels: communities 1..clusters-1 and 0 for the clusters left out of the graph (no edge reaches wt),
as the reference's 20 + 1 labels for VOC's 21 classes; when no cluster is left out, ``clusters``
communities use ids 0..clusters-1. Which community is "background" is left to the Hungarian matching.

Two protocols (``params.protocol``):

- ``label-free`` (default): everything is fitted on the training data, and a new image is segmented
  by assigning its tokens to the learned centroids (fg clusters -> fg mask -> cd cluster ->
  community). Clustering runs at token resolution; only the statistics (precision scores,
  co-occurrence) use the nearest-resized maps. One community detection (best of ``trials``), and
  ``clusters`` communities when no cluster is left out of the graph.
- ``reference``: what the reference's ``fully_unsup_seg.py`` does, for reproducing its table; the switch
  alone also takes tau from the training ground truth and the noisy foreground from ``saliency_dir``
  when set (``params.resolve_protocol``; the fit logs each decision). The
  training split and ``eval_split`` are clustered together (transductive: joint PCA, joint CBFE
  k-means, joint foreground over-clustering and co-occurrence); tau comes from the training scores
  and each split keeps the clusters whose own scores reach it (val's foreground from val's
  saliency); the foreground over-clustering runs on the ``map_size`` x ``map_size`` pixels whose PCA
  features are the nearest-replicated tokens (so pixels weigh by the area they cover), and the CBFE
  masks are made at ``map_size``, as the reference builds and uses them; Infomap runs once per seed 1..``runs``
  (the reference loops over seeds 0..9, which current Infomap rejects: seed must be >= 1), always
  asking for ``clusters - 1`` communities, label 0 for clusters outside the graph. ``unsupseg
  evaluate`` then scores ``eval_split`` as the reference does: label maps at ``map_size``, ground truth
  nearest-resized to it, Hungarian matching on IoU (Leopart's PredsmIoU), mean and std over the
  seeds. ``segment`` uses the first seed's communities.
"""

from .foreground import precomputed_foreground
from .merge import (
    build_graph,
    cluster_precision_scores,
    community_backend,
    community_table,
    cooccurrence,
    detect_communities,
    limit_communities,
    otsu_threshold,
    reference_threshold,
    similarity_weighted,
)
from .params import COMMUNITIES, FOREGROUNDS, GRAPHS, MIN_CLUSTERS, PROTOCOLS, SALIENCIES, Params
from .predictor import LeopartPredictor, build_predictor
from .reference import reference_label_map
from .saliency import distinctiveness, mass_foreground
from .trainer import fit, plan

__all__ = [
    "COMMUNITIES", "FOREGROUNDS", "GRAPHS", "MIN_CLUSTERS", "PROTOCOLS", "SALIENCIES", "LeopartPredictor", "Params",
    "build_graph", "build_predictor", "cluster_precision_scores", "community_backend", "community_table",
    "cooccurrence", "detect_communities", "distinctiveness", "fit", "limit_communities", "mass_foreground",
    "otsu_threshold", "plan", "precomputed_foreground", "reference_label_map", "reference_threshold",
    "similarity_weighted",
]
