"""The ``params:`` section of a CAUSE run (docs/methods/cause.md; defaults are the reference's CAUSE-MLP values on
COCO-Stuff-27, the presets set the per-variant and per-dataset ones)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...errors import ConfigError

_POSITIVE = ("concepts", "reduced_dim", "projection_dim", "bank_size", "grid_window", "tr_ffn_dim", "tr_heads",
             "batch_size", "ref_world_size", "cluster_lr_step_epochs", "checkpoint_every",
             "cluster_init_restarts")
_NON_NEGATIVE = ("mediator_epochs", "head_epochs", "cluster_epochs")


@dataclass
class Params:
    # sizes (§0)
    concepts: int = 2048               # K, clusterbook size
    reduced_dim: int = 90              # r, segmentation feature dim
    projection_dim: int = 2048         # P
    bank_size: int = 100               # entries per concept queue
    bank_keep: float = 0.5             # fraction of a concept's tokens appended per step
    grid_window: int = 4               # grid sub-sampling window (one token per 4x4 window)
    # losses (§2, §3.2; §7.4: configurable thresholds)
    modularity_temperature: float = 0.1
    temperature: float = 0.07          # τc of the contrastive loss
    pos_threshold: float = 0.3         # ϕ+
    neg_threshold: float = 0.1         # ϕ-
    dropout: float = 0.1
    ema_decay: float = 0.99
    # backbone tokens are multiplied by this before the heads, in training and at test time. Cosines
    # (Step 1, VQ, concept ids) do not change; the heads see ViT-like magnitudes from backbones whose
    # features are small, e.g. efficientnet_lite0's per-stage L2-normalised maps (about 0.08 per
    # channel), which the TR head's N(0, 1) query-position table otherwise drowns.
    feature_scale: float = 1.0
    # TR head
    tr_ffn_dim: int = 2048
    tr_heads: int = 1
    tr_window: int | None = None  # TR: train on a random window of this many tokens per side (None: the whole grid)
    tr_grid_window: int | None = (
        None  # TR Steps 2-3: grid sub-sampling window (None: grid_window); 2 samples 4x more tokens of a window
    )
    # schedule (§2, §3.3, §4)
    batch_size: int = 16               # images per step (the global batch under torchrun)
    ref_world_size: int = 4            # §7.1: lr = lr * ref_world_size; epoch = N / (batch * ref_world_size) steps
    lr: float = 1e-3
    weight_decay: float = 1e-4         # head + probe (Step 2), probe (Step 3); 0 for Cityscapes
    grad_clip: float | None = 0.1      # Step 2 gradient-norm clip (None: off)
    cluster_grad_clip: float | None = None   # Step 3 clip of the probe (and of the head with reference_step3)
    mediator_epochs: int = 1
    head_epochs: int = 2
    cluster_epochs: int = 1
    cluster_lr_step_epochs: int = 2    # Step 3 StepLR
    cluster_lr_gamma: float = 0.5
    cluster_loss: str = "modularity"
    # Step 3 centroids: uniform U(-1/C, 1/C) (reference) | kmeans++ seeds | kmeans (converged) among teacher outputs
    cluster_init: str = "uniform"
    cluster_init_restarts: int = (
        10  # cluster_init kmeans: best of this many seeded runs (scikit-learn's classic n_init)
    )
    mediator_resolution: int | None = None   # Step 1 input size (None: data.resolution)
    train_resolution: int | None = None      # Steps 2-3 input size (None: data.resolution)
    # supervision used for monitoring only (§7.2)
    linear_probe: bool = True          # train the supervised linear probe when the data has labels
    reference_step3: bool = False  # reproduce the reference's Step 3 label leakage into the teacher head
    reference_clip: bool = (
        False  # Step 2: clip head, projection and probe by one joint norm (reference) instead of apart
    )
    checkpoint_every: int = 100        # steps between training checkpoints

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE and value < 1 or f.name in _NON_NEGATIVE and value < 0:
                raise ConfigError(
                    f"params.{f.name} must be {'positive' if f.name in _POSITIVE else '>= 0'}, got {value!r}"
                )
        if self.cluster_init not in ("uniform", "kmeans++", "kmeans"):
            raise ConfigError(
                f"params.cluster_init must be 'uniform', 'kmeans++' or 'kmeans', got {self.cluster_init!r}"
            )
        if self.cluster_loss not in ("modularity", "cosine"):
            raise ConfigError(f"params.cluster_loss must be 'modularity' or 'cosine', got {self.cluster_loss!r}")
        for name in ("lr", "temperature", "modularity_temperature", "cluster_lr_gamma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"params.{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or not 0 <= self.dropout < 1 or not 0 <= self.ema_decay <= 1:
            raise ConfigError(
                f"params.weight_decay must be >= 0, params.dropout in [0, 1) and params.ema_decay in [0, 1], "
                f"got {self.weight_decay!r}, {self.dropout!r}, {self.ema_decay!r}"
            )
        if not self.feature_scale > 0:
            raise ConfigError(f"params.feature_scale must be positive, got {self.feature_scale!r}")
        if not 0 < self.bank_keep <= 1:
            raise ConfigError(f"params.bank_keep must be in (0, 1], got {self.bank_keep!r}")
        if self.neg_threshold > self.pos_threshold:
            raise ConfigError(
                f"params.neg_threshold ({self.neg_threshold}) must not exceed pos_threshold ({self.pos_threshold})"
            )
        if self.tr_grid_window is not None and self.tr_grid_window < 1:
            raise ConfigError(f"params.tr_grid_window must be positive, got {self.tr_grid_window!r}")
        if self.tr_window is not None and self.tr_window < self.grid_window:
            raise ConfigError(
                f"params.tr_window ({self.tr_window}) must be at least params.grid_window ({self.grid_window})"
            )
