"""Leopart's fully unsupervised segmentation: its settings (``params`` of a run)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...errors import ConfigError

FOREGROUNDS = ("cbfe", "all")
SALIENCIES = ("auto", "attention", "distinctiveness", "precomputed")
PROTOCOLS = ("label-free", "reference")
COMMUNITIES = ("auto", "infomap", "louvain")
GRAPHS = ("cooccurrence", "cooccurrence-similarity")


MIN_CLUSTERS = 2   # the merge step joins over-clusters into at least two groups


@dataclass
class Params:
    pca_dim: int = 50
    k_fg: int = 200                      # CBFE over-clustering (spherical k-means)
    k_cd: int = 149                      # foreground over-clustering (L2 k-means) = graph nodes
    markov_time: float = 2.0             # Infomap's markov time (mt)
    weight_threshold: float = 0.09       # co-occurrence edge threshold (wt)
    graph: str = "cooccurrence"          # edge weights: cooccurrence (the reference's) | cooccurrence-similarity
                                         # (times the cosine of the two part centroids, negative as 0)
    foreground: str = "cbfe"             # cbfe | all (every token is foreground: no CBFE)
    saliency: str = "auto"               # auto (precomputed when saliency_dir is set, else attention for ViTs, else
                                         # distinctiveness) | attention | distinctiveness
                                         # | precomputed (binary masks DIR/attn_dino_{split}.pt, as the reference's)
    saliency_dir: str | None = None      # saliency: precomputed: the folder of attn_dino_{train,val}.pt
    saliency_mass: float = 0.65          # share of the blurred saliency kept as noisy foreground
    cbfe_threshold: float | None = None  # tau; None: Otsu on the cluster scores
    reference_threshold: bool | None = None  # the reference's tau from ground-truth masks (needs labels);
                                             # None: as the protocol (reference: yes unless cbfe_threshold is set)
    map_size: int = 100                  # side of the maps the statistics are counted on
    community: str = "auto"              # auto (infomap, else louvain) | infomap | louvain
    trials: int = 1                      # Infomap trials (best code length kept)
    louvain_resolution: float = 1.0
    kmeans_iterations: int = 100
    kmeans_restarts: int = 5
    points_per_centroid: int = 256       # k-means trains on at most this many points per centroid
    protocol: str = "label-free"         # label-free | reference (the reference's transductive protocol)
    eval_split: str = "val"              # protocol reference: the split clustered with the training data
    runs: int = 10                       # protocol reference: Infomap seeds 1..runs, scores averaged

    def __post_init__(self) -> None:
        _check(self)


def _check(p: Params) -> None:
    for name in (
        "pca_dim",
        "k_fg",
        "k_cd",
        "map_size",
        "trials",
        "kmeans_iterations",
        "kmeans_restarts",
        "points_per_centroid",
        "runs",
    ):
        if getattr(p, name) < 1:
            raise ConfigError(f"params.{name} must be >= 1, got {getattr(p, name)}")
    for name, value, options in (("foreground", p.foreground, FOREGROUNDS), ("saliency", p.saliency, SALIENCIES),
                                 ("community", p.community, COMMUNITIES), ("protocol", p.protocol, PROTOCOLS),
                                 ("graph", p.graph, GRAPHS)):
        if value not in options:
            raise ConfigError(f"params.{name} must be one of {', '.join(options)}, got {value!r}")
    if not 0 < p.saliency_mass <= 1:
        raise ConfigError(f"params.saliency_mass must be in (0, 1], got {p.saliency_mass}")
    if p.cbfe_threshold is not None and not 0 <= p.cbfe_threshold <= 1:
        raise ConfigError(f"params.cbfe_threshold must be in [0, 1] or null, got {p.cbfe_threshold}")
    if p.reference_threshold and p.cbfe_threshold is not None:
        raise ConfigError("params.reference_threshold and params.cbfe_threshold exclude each other; set one")
    if p.markov_time <= 0 or p.louvain_resolution <= 0 or p.weight_threshold < 0:
        raise ConfigError("params.markov_time and params.louvain_resolution must be > 0, params.weight_threshold >= 0")
    if p.saliency == "precomputed" and not p.saliency_dir:
        raise ConfigError("params.saliency=precomputed needs params.saliency_dir (the folder of attn_dino_{split}.pt)")


def resolve_protocol(p: Params) -> tuple[Params, list[str]]:
    """``p`` with every setting left to the protocol decided, and a note per decision for the log:
    ``protocol: reference`` alone takes tau from the training ground truth and the noisy foreground
    from the masks in ``saliency_dir`` (the reference's precomputed DINO masks) when given."""
    notes = []
    reference = p.protocol == "reference"
    threshold = p.reference_threshold
    if threshold is None:
        threshold = reference and p.cbfe_threshold is None
        if reference and p.foreground == "cbfe":
            notes.append("CBFE threshold from training ground truth" if threshold
                         else f"CBFE threshold {p.cbfe_threshold} (params.cbfe_threshold)")
    saliency = p.saliency
    if saliency == "auto" and p.saliency_dir:
        saliency = "precomputed"
    if reference and p.foreground == "cbfe":
        notes.append(f"noisy foreground from the masks in {p.saliency_dir}" if saliency == "precomputed" else
                     f"noisy foreground from saliency {saliency} (the reference reads precomputed DINO masks: "
                     "params.saliency_dir=DIR of attn_dino_{train,val}.pt)")
    graph = p.graph
    if reference:
        graph = "cooccurrence"
        notes += ["training and params.eval_split clustered together", "co-occurrence graph",
                  f"one Infomap trial per seed 1..{p.runs}, asking for clusters - 1 communities"]
    return replace(p, reference_threshold=threshold, saliency=saliency, graph=graph), notes


# Dense fine-tuning (finetune.py); here so that the crop views and the trainer share it without a cycle.
@dataclass
class FinetuneParams:
    num_prototypes: int = 300           # K
    projection_dim: int = 256           # d
    hidden_dim: int = 2048
    num_global: int = 2                 # G
    num_local: int = 4                  # L
    global_size: int = 224              # S_g (a multiple of the patch size)
    local_size: int = 96                # S_l
    global_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    global_overlap: float = 0.02        # a further global crop must overlap the earlier ones by more
    local_overlap: float = 0.01         # a local crop must overlap every global crop by more
    queue_length: int = 8192            # over all processes; 0: no queue
    epsilon: float = 0.05               # Sinkhorn entropy
    temperature: float = 0.1            # student softmax
    sinkhorn_iterations: int = 3
    loss_mask: str = "fg"               # fg | bg | all
    mask_mass: float = 0.6              # attention mass kept as foreground
    roi_size: int = 7
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.5
    momentum_start: float = 0.9995
    drop_path: float = 0.1              # student stochastic depth of the last block
    use_teacher: bool = True            # False: the student gives its own targets (ablation)
    amp: bool = False                   # bf16 autocast of the ViT forwards on CUDA (Ref: fp32)
    seed: int = 400
    workers: int = 4                    # threads decoding and augmenting images
    checkpoint_every: int = 100
