"""The ``params:`` section of a CAUSE run (cause.md; defaults are the reference's CAUSE-MLP values on
COCO-Stuff-27, the presets set the per-variant and per-dataset ones)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # TR head
    tr_ffn_dim: int = 2048
    tr_heads: int = 1
    tr_window: int | None = None       # TR: train on a random window of this many tokens per side (None: the whole grid)
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
    mediator_resolution: int | None = None   # Step 1 input size (None: data.resolution)
    train_resolution: int | None = None      # Steps 2-3 input size (None: data.resolution)
    # supervision used for monitoring only (§7.2)
    linear_probe: bool = True          # train the supervised linear probe when the data has labels
    reference_step3: bool = False      # reproduce the reference's Step 3 label leakage into the teacher head
    checkpoint_every: int = 100        # steps between training checkpoints
