"""CAUSE training: Step 1 (concept clusterbook), Step 2 (front-door training of the head), Step 3
(cluster probe), each one Stage of the shared engine (progress, checkpoints, exact resume).

Batches come from a ``source`` (the feature cache in a fit: the frozen backbone never runs during
training). Under torchrun every rank draws the same global batch, grid order and bank subset from
identically seeded generators and trains on its shard; the trainable modules are DDP-wrapped (their
gradients are all-reduced), teacher outputs and bank entries are all-gathered, so every rank holds
the same student, teacher and bank. The global torch RNG (dropout) is the same on every rank, so
rank 0's checkpoint resumes all of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine import Dist, GeneratorState, Stage, run_stage
from ...errors import ConfigError
from ...features.clustering import spherical_kmeans
from ..base import FitPlan, StagePlan
from .bank import ConceptBank
from .heads import MLPHead, ProjectionHead, TRHead, ema_update, make_teacher
from .losses import (
    concept_index,
    cosine_cluster_loss,
    draw_grid_order,
    front_door_loss,
    front_door_terms,
    modularity_loss,
    probe_loss,
    sample_grid,
)
from .params import Params

VARIANTS = {"cause-mlp": "mlp", "cause-tr": "tr"}


class StoreSource:
    """Training batches from a FeatureStore: B x D x h x w features (times ``scale``, see
    Params.feature_scale), labels at the image size."""

    def __init__(self, store, labelled: bool, scale: float = 1.0):
        shapes = set(store.shapes)
        if len(shapes) != 1:
            raise ConfigError(
                f"CAUSE trains on batches of equally sized images, but the training features have "
                f"{len(shapes)} different shapes: set data.mode to short_crop or square"
            )
        self.store = store
        self.dim, h, w = shapes.pop()
        self.grid = (h, w)
        self.labelled = labelled and store.label(0) is not None
        self.scale = scale

    def __len__(self) -> int:
        return len(self.store)

    def load(self, batch: Tensor, shard: slice) -> tuple[Tensor, Tensor | None]:
        """Features (and labels, or None) of this rank's share ``batch[shard]`` of a global batch."""
        index = batch[shard].tolist()
        features = self.store.batch(index)
        if self.scale != 1:
            features = features * self.scale
        return features, self.store.labels(index) if self.labelled else None


class WindowSource:
    """One random window of ``window`` x ``window`` tokens per image (and the matching label crop):
    the TR head's query table covers a window; the segmenter tiles windows at test time."""

    def __init__(self, source, window: int, generator: torch.Generator):
        self.source = source
        self.dim, self.labelled = source.dim, source.labelled
        self.grid = (min(window, source.grid[0]), min(window, source.grid[1]))
        self.generator = generator

    def __len__(self) -> int:
        return len(self.source)

    def load(self, batch: Tensor, shard: slice) -> tuple[Tensor, Tensor | None]:
        features, labels = self.source.load(batch, shard)
        (h, w), (wh, ww) = self.source.grid, self.grid
        # offsets are drawn for the whole global batch, so every rank's generator stays in step
        top = torch.randint(h - wh + 1, (len(batch),), generator=self.generator)[shard].tolist()
        left = torch.randint(w - ww + 1, (len(batch),), generator=self.generator)[shard].tolist()
        features = torch.stack([f[:, y : y + wh, x : x + ww] for f, y, x in zip(features, top, left)])
        if labels is not None:
            sy, sx = labels.shape[-2] // h, labels.shape[-1] // w
            labels = torch.stack(
                [lab[y * sy : (y + wh) * sy, x * sx : (x + ww) * sx] for lab, y, x in zip(labels, top, left)]
            )
        return features, labels


def to_tokens(features: Tensor) -> Tensor:
    """B x D x h x w -> B x N x D (row-major tokens)."""
    return features.flatten(2).transpose(1, 2)


def to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """B x N x F -> B x F x h x w."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


@dataclass
class Schedule:
    batch: int
    steps_per_epoch: int
    epochs: int
    seed: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    def batches(self, n_items: int) -> Callable[[int], list[Tensor]]:
        """Epoch -> its batches: a fresh seeded permutation per epoch, so a resumed run sees the same."""

        def draw(epoch: int) -> list[Tensor]:
            perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            return [perm[i * self.batch : (i + 1) * self.batch] for i in range(self.steps_per_epoch)]

        return draw


def make_schedule(params: Params, n_items: int, epochs: int, seed: int) -> Schedule:
    """§7.1: an epoch is N / (batch * ref_world_size) random batches, as one reference replica sees."""
    if n_items < params.batch_size:
        raise ConfigError(f"params.batch_size {params.batch_size} is larger than the {n_items} training images")
    steps = max(1, n_items // (params.batch_size * params.ref_world_size))
    return Schedule(params.batch_size, steps, epochs, seed)


def sampling_window(params: Params, tr: bool) -> int:
    """The grid sub-sampling window of Steps 2-3 (Step 1 always uses params.grid_window)."""
    return params.tr_grid_window if tr and params.tr_grid_window else params.grid_window


def _clip(parameters, limit: float | None) -> None:
    if limit is not None:
        torch.nn.utils.clip_grad_norm_(list(parameters), limit)


def make_probe(reduced_dim: int, classes: int, generator: torch.Generator) -> nn.Linear:
    """The linear probe ℓ with PyTorch's default init drawn from its own generator, so that adding
    it leaves the global RNG (hence every other init and dropout mask) untouched."""
    probe = nn.Linear(reduced_dim, classes, device="meta").to_empty(device="cpu")
    bound = 1 / math.sqrt(reduced_dim)
    with torch.no_grad():
        probe.weight.uniform_(-bound, bound, generator=generator)
        probe.bias.uniform_(-bound, bound, generator=generator)
    return probe


def rng_untouched(device) -> contextlib.AbstractContextManager:
    """Dropout drawn inside does not advance the global RNG (the probe-only teacher pass)."""
    devices = [device] if torch.device(device).type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=torch.device(device).type)


# ----------------------------------------------------------------------------- Step 1


class Mediator(nn.Module):
    """The concept clusterbook M (K x D), trained alone by the modularity loss."""

    def __init__(self, concepts: int, dim: int, generator: torch.Generator, temperature: float):
        super().__init__()
        self.codebook = nn.Parameter(
            torch.empty(concepts, dim).uniform_(-1 / concepts, 1 / concepts, generator=generator)
        )
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return modularity_loss(x, self.codebook, self.temperature)


def mediator_stage(source, params: Params, dist: Dist, seed: int, device) -> tuple[Stage, Mediator]:
    window, grid = params.grid_window, source.grid
    mediator = Mediator(params.concepts, source.dim, torch.Generator().manual_seed(seed * 1000 + 11),
                        params.modularity_temperature).to(device)
    model = dist.wrap(mediator)
    optimizer = torch.optim.Adam(mediator.parameters(), lr=params.lr * params.ref_world_size)
    order_gen = torch.Generator().manual_seed(seed * 1000 + 12)
    schedule = make_schedule(params, len(source), params.mediator_epochs, seed * 1000 + 100)

    def step(_: int, batch: Tensor) -> dict[str, float]:
        shard = dist.shard(len(batch))
        order = draw_grid_order(len(batch), grid, order_gen, window)[shard]
        x = sample_grid(to_tokens(source.load(batch, shard)[0].to(device)), order, grid, window)
        loss = model(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "images": len(batch)}

    stage = Stage(
        "cause-step1-clusterbook", schedule.total, schedule.steps_per_epoch, schedule.batches(len(source)), step,
        {"mediator": mediator, "optimizer": optimizer, "order": GeneratorState(order_gen)}, params.checkpoint_every,
    )
    return stage, mediator


# ----------------------------------------------------------------------------- Step 2


class Student(nn.Module):
    """The trainable part of Step 2: student head h_s, projection g_s and the linear probe ℓ.

    forward(tokens, order, y_lin) -> (Z_s = S(g_s(h_s(·))) on the sampled tokens B x n x P,
    probe logits B x C x h x w on the detached teacher output y_lin, or None without a probe).
    """

    def __init__(self, head: nn.Module, projection: nn.Module, probe: nn.Module | None, grid, window: int):
        super().__init__()
        self.head = head
        self.projection = projection
        self.linear = probe
        self.grid, self.window = grid, window

    def forward(self, tokens: Tensor, order: Tensor, y_lin: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.head, TRHead):  # the decoder needs the full grid; sample its output
            z = self.projection(sample_grid(self.head(tokens), order, self.grid, self.window))
        else:
            z = self.projection(self.head(sample_grid(tokens, order, self.grid, self.window)))
        logits = None
        if self.linear is not None and y_lin is not None:
            logits = to_map(self.linear(y_lin.detach()), self.grid)
        return z, logits


def build_head(variant: str, dim: int, params: Params, codebook: Tensor, grid: tuple[int, int]) -> nn.Module:
    if variant == "tr":
        return TRHead(
            dim, params.reduced_dim, codebook, grid[0] * grid[1], params.tr_ffn_dim, params.tr_heads, params.dropout
        )
    return MLPHead(dim, params.reduced_dim, params.dropout)


@dataclass
class FrontDoor:
    student: Student
    head_teacher: nn.Module
    projection_teacher: nn.Module
    bank: ConceptBank
    grid: tuple[int, int]   # the token grid the head was trained on


def windowed(source, head_is_tr: bool, params: Params, seed: int) -> tuple[object, dict]:
    """The TR source cut to params.tr_window (with its generator's state to checkpoint), or as is."""
    if not (head_is_tr and params.tr_window):
        return source, {}
    generator = torch.Generator().manual_seed(seed)
    return WindowSource(source, params.tr_window, generator), {"window": GeneratorState(generator)}


def front_door_stage(
    source, codebook: Tensor, variant: str, num_classes: int | None, params: Params, dist: Dist, seed: int, device
) -> tuple[Stage, FrontDoor]:
    source, window_state = windowed(source, variant == "tr", params, seed * 1000 + 24)
    window, grid = sampling_window(params, variant == "tr"), source.grid
    codebook = codebook.detach().to(device)
    head = build_head(variant, source.dim, params, codebook, grid)
    probe = None
    if source.labelled and num_classes:
        probe = make_probe(params.reduced_dim, num_classes, torch.Generator().manual_seed(seed * 1000 + 23))
    student = Student(head, ProjectionHead(params.reduced_dim, params.projection_dim), probe, grid, window).to(device)
    head_t, proj_t = make_teacher(student.head), make_teacher(student.projection)
    model = dist.wrap(student)
    student.train(), head_t.train(), proj_t.train()  # teacher dropout is on during training (§7.11)
    optimizer = torch.optim.Adam(
        student.parameters(), lr=params.lr * params.ref_world_size, weight_decay=params.weight_decay
    )
    bank = ConceptBank(params.concepts, params.bank_size, params.projection_dim, params.bank_keep, device)
    unit = F.normalize(codebook, dim=1)
    concept_cos = unit @ unit.T
    order_gen = torch.Generator().manual_seed(seed * 1000 + 21)
    bank_gen = torch.Generator().manual_seed(seed * 1000 + 22)
    schedule = make_schedule(params, len(source), params.head_epochs, seed * 1000 + 200)

    def step(_: int, batch: Tensor) -> dict[str, float]:
        shard = dist.shard(len(batch))
        order = draw_grid_order(len(batch), grid, order_gen, window)[shard].to(device)
        features, labels = source.load(batch, shard)
        tokens = to_tokens(features.to(device))
        with torch.no_grad():
            x = sample_grid(tokens, order, grid, window)
            if variant == "tr":
                y_t = head_t(tokens)
                y_lin, z_t = y_t, proj_t(sample_grid(y_t, order, grid, window))
            else:
                y_lin = None
                if probe is not None:
                    with rng_untouched(device):  # the probe must not shift the unsupervised path's dropout
                        y_lin = head_t(tokens)
                z_t = proj_t(head_t(x))
            concepts = concept_index(x, codebook)
            # every rank's anchors see the candidates of the whole global batch
            z_all = dist.all_gather_cat(z_t.flatten(0, 1))
            concepts_all = dist.all_gather_cat(concepts.flatten())
        z_s, logits = model(tokens, order, y_lin)
        anchors = concepts.numel()
        self_index = torch.arange(anchors, device=device).view_as(concepts) + dist.rank * anchors
        terms, valid = front_door_terms(
            z_s, z_all, concepts, concepts_all, concept_cos, self_index, bank.entries(),
            params.temperature, params.pos_threshold, params.neg_threshold,
        )
        loss_front = front_door_loss(terms, valid)
        loss_probe = probe_loss(logits, labels.to(device)) if logits is not None else torch.zeros((), device=device)
        loss = loss_front + loss_probe
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if params.reference_clip:  # docs/methods/cause.md §3.2: one norm over head, projection and probe
            _clip(student.parameters(), params.grad_clip)
        else:  # apart: under a joint norm the probe's (supervised) gradient would scale the head's update
            _clip(list(student.head.parameters()) + list(student.projection.parameters()), params.grad_clip)
            if probe is not None:
                _clip(probe.parameters(), params.grad_clip)
        optimizer.step()
        ema_update(head_t, student.head, params.ema_decay)
        ema_update(proj_t, student.projection, params.ema_decay)
        bank.update(concepts_all, z_all, bank_gen)
        return {"loss": loss.item(), "front": loss_front.item(), "probe": loss_probe.item(), "images": len(batch)}

    stage = Stage(
        "cause-step2-front-door", schedule.total, schedule.steps_per_epoch, schedule.batches(len(source)), step,
        {"student": student, "head_teacher": head_t, "projection_teacher": proj_t, "optimizer": optimizer,
         "bank": bank, "order": GeneratorState(order_gen), "bank_subset": GeneratorState(bank_gen), **window_state},
        params.checkpoint_every,
    )
    return stage, FrontDoor(student, head_t, proj_t, bank, grid)


# ----------------------------------------------------------------------------- Step 3


class ClusterModel(nn.Module):
    """Step 3: centroids Φ by the modularity loss on the teacher's sampled outputs, and the probe.

    The teacher head is frozen (spec decision, §7.2) unless ``reference``: then the probe's loss
    back-propagates into it, as in the reference.
    """

    def __init__(self, head: nn.Module, clusters: int, probe: nn.Module | None, params: Params,
                 grid, generator: torch.Generator, reference: bool):
        super().__init__()
        self.head = head
        r = params.reduced_dim
        self.centroids = nn.Parameter(
            torch.empty(clusters, r).uniform_(-1 / clusters, 1 / clusters, generator=generator)
        )
        self.linear = probe
        self.reference = reference
        self.temperature = params.modularity_temperature
        self.cluster_loss = params.cluster_loss
        self.grid, self.window = grid, sampling_window(params, isinstance(head, TRHead))
        head.requires_grad_(reference)

    def forward(self, tokens: Tensor, order: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.set_grad_enabled(self.reference and torch.is_grad_enabled()):
            if isinstance(self.head, TRHead):
                y = self.head(tokens)
                sampled = sample_grid(y, order, self.grid, self.window)
            else:
                # a per-token head commutes with S: run it on the sampled tokens only (16x less work);
                # the probe's full-grid pass keeps the RNG stream of the unsupervised path unchanged
                sampled = self.head(sample_grid(tokens, order, self.grid, self.window))
                y = None
                if self.linear is not None:
                    with rng_untouched(tokens.device):
                        y = self.head(tokens)
        if self.cluster_loss == "cosine":
            loss = cosine_cluster_loss(sampled, self.centroids)
        else:
            loss = modularity_loss(sampled, self.centroids, self.temperature)
        logits = None
        if self.linear is not None:
            logits = to_map(self.linear(y if self.reference else y.detach()), self.grid)
        return loss, logits


@torch.no_grad()
def seed_centroids(source, head: nn.Module, clusters: int, params: Params, generator: torch.Generator, device,
                   max_images: int = 256) -> Tensor:
    """Unit centroids among the teacher's sampled outputs S(h_t(T)) of up to ``max_images`` random
    training images, computed without dropout: k-means++ seeds (``cluster_init`` kmeans++), or the
    best of ``cluster_init_restarts`` converged spherical k-means runs (kmeans), which depends far less
    on the draw of the seeds."""
    training = head.training
    window = sampling_window(params, isinstance(head, TRHead))
    head.eval()
    index = torch.randperm(len(source), generator=generator)[: max_images]
    samples = []
    for chunk in index.split(params.batch_size):
        tokens = to_tokens(source.load(chunk, slice(None))[0].to(device))
        order = draw_grid_order(len(chunk), source.grid, generator, window).to(device)
        if isinstance(head, TRHead):
            samples.append(sample_grid(head(tokens), order, source.grid, window))
        else:
            samples.append(head(sample_grid(tokens, order, source.grid, window)))
    head.train(training)
    x = F.normalize(torch.cat(samples).flatten(0, 1).cpu(), dim=1)
    if params.cluster_init == "kmeans":
        return spherical_kmeans(x, clusters, generator, restarts=params.cluster_init_restarts, iterations=100).to(
            device
        )
    return spherical_kmeans(x, clusters, generator, restarts=1, iterations=0).to(device)


def cluster_stage(
    source,
    head_teacher: nn.Module,
    probe: nn.Module | None,
    clusters: int,
    params: Params,
    dist: Dist,
    seed: int,
    device,
) -> tuple[Stage, ClusterModel]:
    source, window_state = windowed(source, isinstance(head_teacher, TRHead), params, seed * 1000 + 33)
    window, grid = sampling_window(params, isinstance(head_teacher, TRHead)), source.grid
    init = torch.Generator().manual_seed(seed * 1000 + 31)
    cluster = ClusterModel(head_teacher, clusters, probe, params, grid, init, params.reference_step3).to(device)
    if params.cluster_init != "uniform":
        cluster.centroids.data.copy_(seed_centroids(source, head_teacher, clusters, params, init, device))
    cluster.train()
    model = dist.wrap(cluster)
    lr = params.lr * params.ref_world_size
    opt_centroids = torch.optim.Adam([cluster.centroids], lr=lr)
    segment_params = [p for m in (cluster.linear, cluster.head if params.reference_step3 else None) if m is not None
                      for p in m.parameters()]
    opt_segment = torch.optim.Adam(segment_params, lr=lr, weight_decay=params.weight_decay) if segment_params else None
    optimizers = [o for o in (opt_centroids, opt_segment) if o is not None]
    order_gen = torch.Generator().manual_seed(seed * 1000 + 32)
    schedule = make_schedule(params, len(source), params.cluster_epochs, seed * 1000 + 300)

    def step(i: int, batch: Tensor) -> dict[str, float]:
        # StepLR(step = cluster_lr_step_epochs epochs), applied from the step number so resume is exact
        factor = params.cluster_lr_gamma ** ((i // schedule.steps_per_epoch) // params.cluster_lr_step_epochs)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        shard = dist.shard(len(batch))
        order = draw_grid_order(len(batch), grid, order_gen, window)[shard].to(device)
        features, labels = source.load(batch, shard)
        loss_clu, logits = model(to_tokens(features.to(device)), order)
        loss_probe = torch.zeros((), device=device)
        if logits is not None:
            loss_probe = probe_loss(logits, labels.to(device))
        loss = loss_clu + loss_probe
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _clip(segment_params, params.cluster_grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        return {"loss": loss.item(), "cluster": loss_clu.item(), "probe": loss_probe.item(), "images": len(batch)}

    state = {
        "cluster": cluster,
        "centroids_optimizer": opt_centroids,
        "order": GeneratorState(order_gen),
        **window_state,
    }
    if opt_segment is not None:
        state["segment_optimizer"] = opt_segment
    stage = Stage("cause-step3-cluster", schedule.total, schedule.steps_per_epoch, schedule.batches(len(source)), step,
                  state, params.checkpoint_every)
    return stage, cluster


# ----------------------------------------------------------------------------- fit


def run_cause(
    variant: str,
    mediator_source,
    train_source,
    clusters: int,
    num_classes: int | None,
    params: Params,
    dist: Dist,
    seed: int,
    device,
    checkpoint_dir,
    log: Callable[[str], None],
) -> dict[str, Tensor]:
    """Steps 1-3 on the given sources; returns the run state (see ``predictor``)."""
    stage, mediator = mediator_stage(mediator_source, params, dist, seed, device)
    run_stage(stage, checkpoint_dir, dist, log)
    codebook = mediator.codebook.detach().clone()
    log(f"CAUSE step 1 done: clusterbook {tuple(codebook.shape)}")

    stage, front = front_door_stage(train_source, codebook, variant, num_classes, params, dist, seed, device)
    run_stage(stage, checkpoint_dir, dist, log)
    log(f"CAUSE step 2 done: bank holds {int(front.bank.length.sum())} entries")

    stage, cluster = cluster_stage(
        train_source, front.head_teacher, front.student.linear, clusters, params, dist, seed, device
    )
    run_stage(stage, checkpoint_dir, dist, log)

    state = {f"head_ema.{k}": v.detach().cpu() for k, v in front.head_teacher.state_dict().items()}
    state["codebook"] = codebook.cpu()
    state["cluster_probe"] = cluster.centroids.detach().cpu()
    if cluster.linear is not None:
        state["linear.weight"] = cluster.linear.weight.detach().cpu()
        state["linear.bias"] = cluster.linear.bias.detach().cpu()
    if variant == "tr":
        state["grid"] = torch.tensor(front.grid)
    return state


def plan(params: Params, method: str, clusters: int, n_items: int, dim: int, tokens: int) -> FitPlan:
    stages = []
    for name, epochs in (
        ("cause-step1-clusterbook", params.mediator_epochs),
        ("cause-step2-front-door", params.head_epochs),
        ("cause-step3-cluster", params.cluster_epochs),
    ):
        schedule = make_schedule(params, n_items, epochs, 0)
        stages.append(StagePlan(name, schedule.steps_per_epoch, schedule.total, params.batch_size))
    bank = params.concepts * params.bank_size * params.projection_dim * 4
    return FitPlan(
        [params.mediator_resolution, params.train_resolution], stages,
        [(f"concept bank (concepts {params.concepts} x bank_size {params.bank_size} x projection_dim "
          f"{params.projection_dim} x 4 bytes), also in each Step 2 checkpoint", bank),
         (f"clusterbook ({params.concepts} x {dim} x 4 bytes)", params.concepts * dim * 4)],
    )


def fit(ctx) -> dict[str, Tensor]:
    params: Params = ctx.params
    config = ctx.config
    variant = VARIANTS[config.method]
    torch.manual_seed(config.seed)
    labelled = params.linear_probe and ctx.num_classes is not None
    mediator_store = ctx.features(resolution=params.mediator_resolution)
    train_store = ctx.features(resolution=params.train_resolution)
    mediator_source = StoreSource(mediator_store, labelled=False, scale=params.feature_scale)
    train_source = StoreSource(train_store, labelled, scale=params.feature_scale)
    window = f", TR windows of {params.tr_window} tokens" if variant == "tr" and params.tr_window else ""
    ctx.log(
        f"CAUSE-{variant.upper()}: {len(train_source)} images, token grid {train_source.grid[0]}x{train_source.grid[1]}"
        f"{window} (step 1: {mediator_source.grid[0]}x{mediator_source.grid[1]}), K = {params.concepts}, "
        f"linear probe {'on' if train_source.labelled else 'off'}"
    )
    return run_cause(
        variant, mediator_source, train_source, config.clusters, ctx.num_classes, params, ctx.dist, config.seed,
        ctx.device, ctx.checkpoint_dir, ctx.log,
    )
