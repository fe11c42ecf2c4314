"""STEGO: distilling feature correspondences into a low-dimensional code (Hamilton et al., ICLR 2022).

Follows the reference code (mhamilton723/STEGO, the code that trained the released checkpoints), see
docs/methods/stego.md:

* head (§2): ``code = cluster1(drop(f)) + cluster2(drop(f))`` with 1x1 convolutions, ``cluster2`` =
  conv D->D, ReLU, conv D->d; each branch draws its own Dropout2d mask, and the features the loss
  correlates ("signal") get a third one;
* contrastive correlation loss (§4): 11x11 random points per image, sampled bilinearly
  (align_corners, border padding); feature and code cosine correlations; pointwise centring of the
  feature correlation; ``-mean(clamp(Sc, 0) * (Fc - shift))`` for the image with itself (both sides at
  the same points), with a kNN image and with 5 derangement-permuted batches;
* probes on the detached code (§6): the unsupervised cluster probe (spherical k-means by gradient
  descent) used for prediction, and a supervised linear probe for scoring only, trained when the
  training data has labels;
* three Adam optimisers, one backward per step (§7); prediction: code, flip-averaged and upsampled by
  the Segmenter, cosine to the cluster probe (§8).

Training reads the frozen backbone's features from the feature cache (the backbone never runs
during training); the kNN partner of image i is read from the cache by index. Of the reference's
optional, weight-0 terms the feature reconstruction term is available (``rec_weight``); the
aug-alignment and CRF-style losses need augmented views or pixels of every training image at every
step, which a feature-cache trainer does not have, and are not implemented (both are off in every
released configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import GeneratorState, Stage, run_stage
from ..errors import CheckpointError, ConfigError
from ..features.knn import knn_table, sample_neighbours
from .base import FitContext, FitPlan, Method, Predictor, PredictorInfo, StagePlan, cosine_scores
from .registry import register_method


@dataclass
class Params:
    # Names of the reference config in brackets. Defaults: the active block of its train_config.yml.
    dim: int = 70                       # code dimension d [dim]
    projection: str = "nonlinear"       # linear | nonlinear [projection_type]
    dropout: float = 0.1                # Dropout2d probability of every feature mask
    signal_dropout: bool = True         # correlate channel-dropped features in the loss [dropout]
    steps: int = 5000                   # [max_steps]
    batch_size: int = 16                # images per step, all processes together (Ref: per GPU [batch_size])
    lr: float = 5e-4                    # head (Adam) [lr]
    linear_lr: float = 5e-3             # linear probe (Adam)
    cluster_lr: float = 5e-3            # cluster probe (Adam)
    feature_samples: int = 11           # S: S x S points per image [feature_samples]
    neg_samples: int = 5                # random-partner repetitions [neg_samples]
    knn_k: int = 7                      # partner drawn from neighbour ranks 1..k [num_neighbors]
    knn_pool: int = 30                  # neighbours stored per image
    pointwise: bool = True              # centre feature correlations per anchor point [pointwise]
    zero_clamp: bool = True             # clamp code correlations at 0 [zero_clamp]
    stabilize: bool = False             # also clamp them at 0.8 [stabalize]
    correspondence_weight: float = 1.0  # lambda_corr
    weight_self: float = 0.67           # [pos_intra_weight]
    weight_knn: float = 0.25            # [pos_inter_weight]
    weight_rand: float = 0.63           # [neg_inter_weight]
    shift_self: float = 0.18            # [pos_intra_shift]
    shift_knn: float = 0.12             # [pos_inter_shift]
    shift_rand: float = 0.46            # [neg_inter_shift]
    rec_weight: float = 0.0             # reconstruct the features from the code (off in the reference)
    linear_probe: bool = True           # train the evaluation-only linear probe when labels exist
    crop: int | None = None             # train on random crop x crop windows of the feature maps
    checkpoint_every: int = 400

    def __post_init__(self) -> None:
        for name in ("dim", "steps", "feature_samples", "neg_samples", "knn_k", "knn_pool", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"params.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(
                f"params.batch_size must be at least 2 (the random-partner term pairs images), got {self.batch_size}"
            )
        if self.crop is not None and self.crop < 1:
            raise ConfigError(f"params.crop must be at least 1 or null, got {self.crop}")
        for name in ("lr", "linear_lr", "cluster_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"params.{name} must be positive, got {getattr(self, name)}")
        for name in ("correspondence_weight", "rec_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"params.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"params.dropout must be in [0, 1), got {self.dropout}")
        if self.projection not in ("linear", "nonlinear"):
            raise ConfigError(f"params.projection must be 'linear' or 'nonlinear', got {self.projection!r}")


# ----------------------------------------------------------------------------- pure functions


def norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def random_coords(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """n x S x S x 2 points uniform in [-1, 1]^2 (grid_sample's (x, y) order)."""
    return torch.rand(n, samples, samples, 2, generator=generator) * 2 - 1


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """B x C x S x S values of ``t`` at ``coords`` (bilinear, align_corners, border padding)."""
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's ``super_perm``: a random permutation whose fixed points i are replaced by
    (i + 1) mod n, so no element maps to itself (indices may repeat)."""
    if n < 2:
        raise ConfigError(f"STEGO's random-partner term needs at least 2 images per process, got {n}")
    perm = torch.randperm(n, generator=generator)
    fixed = perm == torch.arange(n)
    perm[fixed] += 1
    return perm % n


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every point of ``a`` to every point of ``b``: B x h x w x i x j."""
    return torch.einsum("nchw,ncij->nhwij", norm(a), norm(b))


def pointwise_normalize(fc: torch.Tensor) -> torch.Tensor:
    """Subtract each anchor point's mean over the partner points, then add back the global mean of
    the uncentred tensor (the reference's formula, which the checkpoints used)."""
    old_mean = fc.mean()
    fc = fc - fc.mean(dim=(3, 4), keepdim=True)
    return fc - fc.mean() + old_mean


def correlation_term(
    f1: torch.Tensor,
    f2: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correlation term on sampled features f1, f2 and codes z1, z2 (B x C x S x S each).

    Returns (loss map ``-clamp(Sc) * (Fc - shift)``, code correlation Sc), both B x S x S x S x S. The
    feature correlation carries no gradient; the clamp stops the gradient where Sc is clamped.
    """
    with torch.no_grad():
        fc = correlation(f1, f2)
        if pointwise:
            fc = pointwise_normalize(fc)
    sc = correlation(z1, z2)
    low = 0.0 if zero_clamp else -9999.0
    clamped = sc.clamp(low, 0.8) if stabilize else sc.clamp(min=low)
    return -clamped * (fc - shift), sc


def correlation_loss(
    signal: torch.Tensor,
    signal_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    coords1: torch.Tensor,
    coords2: torch.Tensor,
    perms: list[torch.Tensor],
    params: Params,
) -> dict[str, torch.Tensor]:
    """STEGO's three terms (docs/methods/stego.md §4.5) for anchors (signal, code) and their kNN partners.

    ``coords1`` places the anchor points, ``coords2`` the partner points (kNN and random partners);
    ``perms`` are the derangements choosing each random partner from the batch. Returns the weighted
    total under "loss", each term's mean loss ("self", "knn", "rand") and mean code correlation
    ("cd_self", "cd_knn", "cd_rand", the quantities the reference logs for tuning the shifts).
    """
    opts = dict(pointwise=params.pointwise, zero_clamp=params.zero_clamp, stabilize=params.stabilize)
    f1, z1 = sample_points(signal, coords1), sample_points(code, coords1)
    f2, z2 = sample_points(signal_pos, coords2), sample_points(code_pos, coords2)
    # the self term pairs the anchor samples with themselves: the same points on both sides
    self_loss, self_cd = correlation_term(f1, f1, z1, z1, params.shift_self, **opts)
    knn_loss, knn_cd = correlation_term(f1, f2, z1, z2, params.shift_knn, **opts)
    rand_losses, rand_cds = [], []
    for perm in perms:
        f_neg, z_neg = sample_points(signal[perm], coords2), sample_points(code[perm], coords2)
        loss, cd = correlation_term(f1, f_neg, z1, z_neg, params.shift_rand, **opts)
        rand_losses.append(loss)
        rand_cds.append(cd)
    terms = {"self": self_loss.mean(), "knn": knn_loss.mean(), "rand": torch.cat(rand_losses).mean()}
    total = params.correspondence_weight * (
        params.weight_knn * terms["knn"] + params.weight_self * terms["self"] + params.weight_rand * terms["rand"]
    )
    return {
        "loss": total,
        **terms,
        "cd_self": self_cd.detach().mean(),
        "cd_knn": knn_cd.detach().mean(),
        "cd_rand": torch.cat(rand_cds).detach().mean(),
    }


def cluster_probe_loss(code: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Minibatch spherical k-means by gradient descent: ``-mean over pixels of the cosine to the
    nearest centroid`` (hard assignment, no gradient through it)."""
    scores = cosine_scores(code, clusters)
    assignment = F.one_hot(scores.argmax(1), clusters.shape[0]).permute(0, 3, 1, 2).to(scores.dtype)
    return -(assignment * scores).sum(1).mean()


def linear_probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of probe logits, bilinearly upsampled to the label size, over the pixels whose
    label is a class (0 <= label < C)."""
    num_classes = logits.shape[1]
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.where((labels >= 0) & (labels < num_classes), torch.full_like(labels, -1))
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0   # keeps the probe in the graph (DDP expects a gradient for it)
    return F.cross_entropy(logits, labels, ignore_index=-1)


def reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Negative cosine between the features and their reconstruction from the code."""
    return -(norm(reconstruction) * norm(features)).sum(1).mean()


# ----------------------------------------------------------------------------- modules


class StegoHead(nn.Module):
    """``code = cluster1(drop(f)) [+ cluster2(drop(f))]``; ``forward`` also returns the loss signal
    (``drop(f)`` with a third mask when ``signal_dropout``). Parameter names match the reference's
    ``net.cluster1`` / ``net.cluster2``."""

    def __init__(
        self, in_dim: int, dim: int, projection: str = "nonlinear", dropout: float = 0.1, signal_dropout: bool = True
    ):
        super().__init__()
        if projection not in ("linear", "nonlinear"):
            raise ConfigError(f"params.projection must be 'linear' or 'nonlinear', got {projection!r}")
        self.cluster1 = nn.Sequential(nn.Conv2d(in_dim, dim, 1))
        self.cluster2 = (
            nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))
            if projection == "nonlinear" else None
        )
        self.dropout = nn.Dropout2d(dropout)
        self.signal_dropout = signal_dropout

    def code(self, features: torch.Tensor) -> torch.Tensor:
        code = self.cluster1(self.dropout(features))
        if self.cluster2 is not None:
            code = code + self.cluster2(self.dropout(features))
        return code

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.code(features)
        signal = self.dropout(features) if self.signal_dropout else features
        return signal, code


class _Trainable(nn.Module):
    """Everything that trains, as one module so one DDP wrapper all-reduces every gradient: the head,
    the cluster probe, and when used the linear probe and the reconstruction decoder. The probes
    see only the detached anchor code."""

    def __init__(self, head: StegoHead, in_dim: int, dim: int, clusters: int, num_classes: int | None,
                 reconstruct: bool, generator: torch.Generator):
        super().__init__()
        self.head = head
        self.cluster_probe = nn.Parameter(torch.randn(clusters, dim, generator=generator))
        self.linear_probe = nn.Conv2d(dim, num_classes, 1) if num_classes else None
        self.decoder = nn.Conv2d(dim, in_dim, 1) if reconstruct else None

    def forward(self, features: torch.Tensor, n_anchor: int, labels: torch.Tensor | None):
        signal, code = self.head(features)
        anchor = code[:n_anchor].detach()
        losses = {"cluster": cluster_probe_loss(anchor, self.cluster_probe)}
        if self.linear_probe is not None:
            losses["linear"] = linear_probe_loss(self.linear_probe(anchor), labels)
        if self.decoder is not None:
            losses["rec"] = reconstruction_loss(self.decoder(code[:n_anchor]), signal[:n_anchor])
        return signal, code, losses


class StegoPredictor(Predictor):
    """Code of the head (no dropout) as embedding; cosine to the cluster-probe centroids as scores."""

    def __init__(self, head: StegoHead, clusters: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("clusters", clusters.float())

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.code(features)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return cosine_scores(embedding, self.clusters)


def head_state(head: StegoHead) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}


def build_predictor(params: Params, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
    for key in ("head.cluster1.0.weight", "head.cluster1.0.bias", "cluster_probe"):
        if key not in state:
            raise CheckpointError(f"STEGO state lacks {key!r}; present: {', '.join(sorted(state))}")
    weight = state["head.cluster1.0.weight"]
    dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
    if in_dim != info.feature_dim:
        raise CheckpointError(
            f"STEGO head expects {in_dim}-dim features but the backbone gives {info.feature_dim}: "
            "the run was trained on another backbone"
        )
    clusters = state["cluster_probe"]
    if clusters.shape != (info.num_clusters, dim):
        raise CheckpointError(
            f"STEGO cluster probe has shape {tuple(clusters.shape)}; expected ({info.num_clusters}, {dim}) "
            "from the run config (clusters) and the head"
        )
    projection = "nonlinear" if "head.cluster2.0.weight" in state else "linear"
    head = StegoHead(in_dim, dim, projection, params.dropout, params.signal_dropout)
    try:
        head.load_state_dict({k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")})
    except RuntimeError as err:
        raise CheckpointError(f"STEGO head weights do not fit a {in_dim} -> {dim} {projection} head: {err}") from None
    return StegoPredictor(head.eval(), clusters)


# ----------------------------------------------------------------------------- training


def _check(params: Params, n_images: int, shapes, world: int, pool: int) -> None:
    if params.batch_size < 2 * world:
        raise ConfigError(f"params.batch_size={params.batch_size} must give every process at least 2 images")
    if n_images < params.batch_size:
        raise ConfigError(
            f"STEGO needs at least params.batch_size={params.batch_size} training images, got {n_images}: "
            f"for a small collection pass --set params.batch_size={max(n_images, 2)}"
            + (f" --set params.knn_k={max(n_images - 1, 1)}" if params.knn_k >= n_images else "")
        )
    if not 1 <= params.knn_k < pool:
        raise ConfigError(
            f"params.knn_k={params.knn_k} must be between 1 and {pool - 1} (neighbours stored per image: "
            f"the {pool - 1} other images at most); pass --set params.knn_k={max(pool - 1, 1)} or fewer"
        )
    if params.crop is None:
        if len(set(shapes)) > 1:
            raise ConfigError(
                "STEGO batches feature maps of one size, but the training features have several "
                f"({sorted(set(s[1:] for s in shapes))[:3]} ...): set data.mode=short_crop or params.crop"
            )
    elif not 1 <= params.crop <= min(min(s[1], s[2]) for s in shapes):
        raise ConfigError(f"params.crop={params.crop} must be between 1 and the smallest feature map side")
    if params.steps < 1 or params.feature_samples < 1 or params.neg_samples < 1:
        raise ConfigError("params.steps, params.feature_samples and params.neg_samples must be positive")


def _windows(
    n: int, shapes: list[tuple[int, int]], crop: int | None, generator: torch.Generator
) -> list[tuple[int, int]]:
    """Top-left corner of a random crop window in each of n maps (0, 0 without cropping)."""
    if crop is None:
        return [(0, 0)] * n
    u = torch.rand(n, 2, generator=generator)
    return [(int(a * (h - crop + 1)), int(b * (w - crop + 1))) for (a, b), (h, w) in zip(u.tolist(), shapes)]


def neighbour_table(ctx: FitContext, store) -> torch.Tensor:
    """The kNN table of the training features, computed once per feature-cache entry (by the main
    process first; the others then read it)."""
    pool = min(ctx.params.knn_pool, len(store))
    if ctx.dist.is_main:
        table, hit = knn_table(store, pool)
        ctx.log(f"kNN table ({len(store)} images, top {pool}): {'read from cache' if hit else 'computed'}"
                + (f" in {store.path}" if store.path is not None else " (streamed features, not cached)"))
    ctx.dist.barrier()
    if not ctx.dist.is_main:
        table, _ = knn_table(store, pool)
    return table


def load_windows(store, indices: torch.Tensor, windows, c: int | None, labels: bool, device: torch.device):
    """The features (and labels) of ``indices``' ``c`` x ``c`` windows at ``windows`` (whole maps when
    ``c`` is None), stacked on ``device``."""
    index = indices.tolist()
    # one read for the batch (one backbone pass when the features are streamed), then the windows
    if len({store.shapes[i] for i in index}) == 1:
        full, full_labels = store.batch(index), store.labels(index) if labels else None
    else:
        full = [store[i].float() for i in index]
        full_labels = [store.label(i) for i in index] if labels else None
    maps, maps_labels = [], []
    for j, (i, (y, x)) in enumerate(zip(index, windows)):
        maps.append(full[j] if c is None else full[j][:, y : y + c, x : x + c])
        if labels:
            lab = full_labels[j]
            scale = lab.shape[0] // store.shapes[i][1]
            maps_labels.append(lab if c is None else lab[y * scale : (y + c) * scale, x * scale : (x + c) * scale])
    feats = torch.stack(maps).to(device)
    return feats, (torch.stack(maps_labels).to(device) if labels else None)


def build_training(ctx: FitContext, store, table: torch.Tensor) -> tuple[Stage, _Trainable]:
    """The training stage (on the shared engine) and the module it trains, for the cached features
    ``store`` and their kNN ``table``."""
    params: Params = ctx.params
    dist, device = ctx.dist, ctx.device
    n = len(store)
    _check(params, n, store.shapes, dist.world_size, table.shape[1])
    num_classes = ctx.num_classes if params.linear_probe and store.label_shapes is not None else None
    with torch.random.fork_rng():
        # the head's default init draws from the global RNG: seed it so the init is the run's own
        torch.manual_seed(ctx.config.seed)
        head = StegoHead(store.dim, params.dim, params.projection, params.dropout, params.signal_dropout)
        model = _Trainable(head, store.dim, params.dim, ctx.config.clusters, num_classes, params.rec_weight > 0,
                           ctx.generator(1)).to(device).train()
    wrapped = dist.wrap(model)
    head_params = list(model.head.parameters()) + (
        list(model.decoder.parameters()) if model.decoder is not None else []
    )
    optimizers = {"head_optimizer": torch.optim.Adam(head_params, lr=params.lr),
                  "cluster_optimizer": torch.optim.Adam([model.cluster_probe], lr=params.cluster_lr)}
    if model.linear_probe is not None:
        optimizers["linear_optimizer"] = torch.optim.Adam(model.linear_probe.parameters(), lr=params.linear_lr)
    sampler = ctx.generator(2)     # kNN ranks, crop windows, points, permutations
    order_seed = int(torch.randint(2**62, (1,), generator=ctx.generator(3)))
    steps_per_epoch = n // params.batch_size
    local = dist.shard(params.batch_size)
    map_shapes = [(s[1], s[2]) for s in store.shapes]

    def batches(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed + epoch))
        return [order[i * params.batch_size : (i + 1) * params.batch_size] for i in range(steps_per_epoch)]

    def step(i: int, idx: torch.Tensor) -> dict[str, float]:
        # draws for the whole batch on every process (same generator state), then this process's share
        partners = sample_neighbours(table, idx, params.knn_k, sampler)
        win = _windows(len(idx), [map_shapes[j] for j in idx.tolist()], params.crop, sampler)
        win_pos = _windows(len(idx), [map_shapes[j] for j in partners.tolist()], params.crop, sampler)
        coords1 = random_coords(len(idx), params.feature_samples, sampler)[local].to(device)
        coords2 = random_coords(len(idx), params.feature_samples, sampler)[local].to(device)
        feats, labels = load_windows(store, idx[local], win[local], params.crop, num_classes is not None, device)
        feats_pos, _ = load_windows(store, partners[local], win_pos[local], params.crop, False, device)
        b = len(feats)
        perms = [derangement(b, sampler).to(device) for _ in range(params.neg_samples)]

        signal, code, probe_losses = wrapped(torch.cat([feats, feats_pos]), b, labels)
        terms = correlation_loss(signal[:b], signal[b:], code[:b], code[b:], coords1, coords2, perms, params)
        loss = terms["loss"] + probe_losses["cluster"] + probe_losses.get("linear", 0.0)
        if "rec" in probe_losses:
            loss = loss + params.rec_weight * probe_losses["rec"]
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
        logs = {"loss": float(loss.detach()), "images": b}
        logs.update({k: float(v.detach()) for k, v in terms.items() if k != "loss"})
        logs.update({k: float(v.detach()) for k, v in probe_losses.items()})
        return logs

    stage = Stage(
        "stego", params.steps, steps_per_epoch, batches, step,
        {"model": model, **optimizers, "sampler": GeneratorState(sampler)},
        checkpoint_every=params.checkpoint_every,
    )
    return stage, model


def plan(params: Params, method: str, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
    per_epoch = max(1, n_items // params.batch_size)
    return FitPlan(
        [None],
        [StagePlan("stego", per_epoch, params.steps, params.batch_size)],
        [("kNN descriptors (float32)", n_items * dim * 4), ("kNN table (int64)", n_items * params.knn_pool * 8)],
        ["one pass over the features for the kNN table, then training"],
    )


def fit(ctx: FitContext) -> dict[str, torch.Tensor]:
    params: Params = ctx.params
    store = ctx.features()
    table = neighbour_table(ctx, store)
    stage, model = build_training(ctx, store, table)
    ctx.log(
        f"STEGO: {len(store)} images, {store.dim}-dim features -> {params.dim}-dim code, {ctx.config.clusters} "
        f"clusters, "
        f"{params.steps} steps of {params.batch_size} images"
        + (f" ({params.crop}x{params.crop} feature crops)" if params.crop else "")
        + (", linear probe on" if model.linear_probe is not None else "")
    )
    history = run_stage(stage, ctx.checkpoint_dir, ctx.dist, ctx.log)
    if history:
        tail = history[-min(len(history), 50):]
        mean = {k: sum(h[k] for h in tail) / len(tail) for k in ("loss", "cd_self", "cd_knn", "cd_rand", "cluster")}
        ctx.log("STEGO last steps: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))

    state = {**head_state(model.head), "cluster_probe": model.cluster_probe.detach().clone(), "knn": table.clone()}
    if model.linear_probe is not None:
        state["linear_probe.weight"] = model.linear_probe.weight.detach().clone()
        state["linear_probe.bias"] = model.linear_probe.bias.detach().clone()
    return {k: v.cpu() for k, v in state.items()}


@register_method
class Stego(Method):
    name = "stego"
    Params = Params
    MIN_CLUSTERS = 2   # one cluster segments nothing; the cluster probe's loss needs a choice
    LINEAR_PROBE = ("linear_probe.weight", "linear_probe.bias")   # on the code, see LinearProbe

    def fit(self, ctx: FitContext) -> dict[str, torch.Tensor]:
        return fit(ctx)

    def build_predictor(self, params: Params, state: dict[str, torch.Tensor], info: PredictorInfo) -> Predictor:
        return build_predictor(params, state, info)

    def plan(self, params: Params, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
        return plan(params, self.name, clusters, n_items, dim, tokens)
