"""Leopart fine-tuning of a ViT backbone (docs/methods/leopart.md §1), on the shared training engine.

Per image: V = G global + L local crops with overlap constraints (§1.2); the EMA teacher scores the
global crops' tokens against K prototypes, Sinkhorn-Knopp turns them (with a queue of earlier
foreground embeddings) into soft targets (§1.5); targets and the student's scores of every other crop
are RoI-aligned onto their common rectangle (7 x 7) and compared by cross-entropy, weighted by the
teacher's attention foreground (§1.4, §1.6-1.7). AdamW with cosine LR / WD / EMA schedules (§1.8).

``finetune(...)`` writes the student ViT (timm names, safetensors): ``build_backbone(name,
weights=that_file)`` turns it into a frozen backbone for any method. Resumable: checkpoints go to
``<out>/checkpoints/`` and an interrupted run with the same settings continues where it stopped.
Distributed under torchrun (the student is DDP-wrapped, Sinkhorn sums are all-reduced); ``batch_size``
is the number of images per step over all processes. Its default is the reference's effective batch
(32 images on each of 2 GPUs for ViT-S/16, 16 on each of 2 for ViT-B/8): one process with 64 (32)
images steps like the reference's two, since Sinkhorn, the queue (8192 rows in all) and the
schedules all see the global batch. Under ``torchrun --nproc_per_node N`` keep batch_size at the
global number (each process gets batch_size / N).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..._io import atomic_path, atomic_write_text
from ...backbones import build_vit_model, get_spec
from ...config import dump_yaml, from_dict, load_yaml, to_dict
from ...data import ImageFolder
from ...engine import Dist, GeneratorState, Stage, init_distributed, run_stage
from ...errors import ConfigError, RunDirError
from .params import FinetuneParams
from .saliency import mass_foreground
from .views import collate, make_views

LOSS_MASKS = ("fg", "bg", "all")
CONFIG = "finetune.yaml"
CHECKPOINTS = "checkpoints"


def check_params(p: FinetuneParams, patch: int) -> None:
    if p.loss_mask not in LOSS_MASKS:
        raise ConfigError(f"loss_mask must be one of {', '.join(LOSS_MASKS)}, got {p.loss_mask!r}")
    for name in ("global_size", "local_size"):
        size = getattr(p, name)
        if size < patch or size % patch:
            raise ConfigError(f"{name}={size} must be a positive multiple of the patch size {patch}")
    if p.num_global < 1 or p.num_local < 0 or p.num_global + p.num_local < 2:
        raise ConfigError(f"need num_global >= 1 and at least two crops, got {p.num_global} + {p.num_local}")
    for name in ("global_scale", "local_scale", "ratio"):
        low, high = getattr(p, name)
        if not 0 < low <= high:
            raise ConfigError(f"{name} must be [low, high] with 0 < low <= high, got {getattr(p, name)}")
    if p.epsilon <= 0 or p.temperature <= 0:
        raise ConfigError(f"epsilon and temperature must be > 0, got {p.epsilon}, {p.temperature}")
    for name in (
        "num_prototypes",
        "projection_dim",
        "hidden_dim",
        "roi_size",
        "sinkhorn_iterations",
        "workers",
        "checkpoint_every",
    ):
        if getattr(p, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(p, name)}")
    for name in ("lr_backbone", "lr_head", "weight_decay_start", "weight_decay_end"):
        if getattr(p, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(p, name)}")
    if not 0 <= p.momentum_start <= 1 or not 0 <= p.drop_path < 1:
        raise ConfigError(
            f"momentum_start must be in [0, 1] and drop_path in [0, 1), got {p.momentum_start}, {p.drop_path}"
        )
    if p.queue_length < 0 or not 0 < p.mask_mass <= 1:
        raise ConfigError(f"queue_length must be >= 0 and mask_mass in (0, 1], got {p.queue_length}, {p.mask_mass}")


class _Prefetcher:
    """Loads the batches of an epoch in threads, a few ahead of the one asked for. Only batches that
    are asked for get loaded (a resumed epoch skips its finished batches for free); each image draws
    from its own seeded RNG, so the result does not depend on thread scheduling."""

    def __init__(
        self, load: Callable[[list[int]], dict], batches: list[list[int]], pool: ThreadPoolExecutor, depth: int
    ):
        self.load, self.batches, self.pool, self.depth = load, batches, pool, depth
        self.futures: dict = {}

    def get(self, i: int) -> dict[str, Tensor]:
        for j in range(i, min(i + self.depth + 1, len(self.batches))):
            if j not in self.futures:
                self.futures[j] = self.pool.submit(self.load, self.batches[j])
        return self.futures.pop(i).result()


# ----------------------------------------------------------------------------- model (§1.1)


class LeopartNet(nn.Module):
    """ViT encoder + per-token projection head (D-2048-2048-d, GELU, no norm, L2-normalised) +
    bias-free prototypes (K x d). ``forward`` takes crop groups of equal size (one DDP forward for
    all of them) and returns their scores B x K x h x w."""

    def __init__(self, encoder: nn.Module, p: FinetuneParams, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder
        dim = encoder.dim
        self.head = nn.Sequential(
            nn.Linear(dim, p.hidden_dim), nn.GELU(), nn.Linear(p.hidden_dim, p.hidden_dim), nn.GELU(),
            nn.Linear(p.hidden_dim, p.projection_dim),
        )
        self.prototypes = nn.Linear(p.projection_dim, p.num_prototypes, bias=False)
        with torch.no_grad():
            for module in [*self.head, self.prototypes]:
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed(self, features: Tensor) -> Tensor:
        """B x D x h x w -> unit embeddings B x d x h x w."""
        z = self.head(features.permute(0, 2, 3, 1))
        return F.normalize(z, dim=-1).permute(0, 3, 1, 2)

    def score(self, z: Tensor) -> Tensor:
        return torch.einsum("bdhw,kd->bkhw", z, self.prototypes.weight)

    def forward(self, groups: list[Tensor]) -> list[Tensor]:
        return [self.score(self.embed(self.encoder(x))) for x in groups]

    @torch.no_grad()
    def targets_forward(self, images: Tensor, attention: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(scores, embeddings, head-averaged CLS attention or None) of a batch of global crops."""
        if attention:
            features, attn = self.encoder(images, return_attention=True)
            attn = attn.float().mean(1)
        else:
            features, attn = self.encoder(images), None
        z = self.embed(features)
        return self.score(z), z, attn


# ----------------------------------------------------------------------------- targets and loss


def _all_reduce_sum(dist: Dist | None, tensor: Tensor) -> Tensor:
    if dist is None or not dist.enabled:
        return tensor
    return dist.all_reduce_mean(tensor) * dist.world_size


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, dist: Dist | None = None) -> Tensor:
    """Sinkhorn-Knopp on B x K scores in [-1, 1] (spec §1.5): B x K assignments whose rows sum to 1
    and whose columns share the mass equally. Sums run over every process's rows."""
    # exp((s - 1) / eps) <= 1 cannot overflow; the constant factor cancels in the first normalisation
    q = torch.exp((scores.float() - 1) / epsilon).T
    k = q.shape[0]
    b = float(_all_reduce_sum(dist, torch.tensor(float(q.shape[1]), device=q.device)))
    q /= _all_reduce_sum(dist, q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum(dist, q.sum(1, keepdim=True))
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    q /= q.sum(0, keepdim=True)
    return q.T


def align(maps: Tensor, boxes: Tensor, size: int) -> Tensor:
    """RoI-Align (aligned, adaptive sampling) of B x C x h x w maps with B x R x 4 boxes in token
    units -> B x R x C x size x size (image-major)."""
    b, r = boxes.shape[:2]
    out = roi_align(
        maps, list(boxes.to(maps.dtype)), output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    return out.reshape(b, r, *out.shape[1:])


def masked_cross_entropy(q: Tensor, log_p: Tensor, mask: Tensor | None) -> Tensor:
    """-sum_k q log p per cell, averaged over the cells where ``mask`` holds (0 when none does);
    a plain mean without a mask."""
    ce = -(q * log_p).sum(1)
    if mask is None:
        return ce.mean()
    m = mask.to(ce.dtype)
    total = m.sum()
    return (ce * m).sum() / total if total > 0 else ce.sum() * 0


class Queue(nn.Module):
    """One FIFO of teacher embeddings per global crop (spec §1.5)."""

    def __init__(self, crops: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("items", torch.zeros(crops, length, dim))

    @property
    def length(self) -> int:
        return self.items.shape[1]

    def full(self, g: int) -> bool:
        return self.length > 0 and bool(self.items[g, -1].any())

    @torch.no_grad()
    def push(self, g: int, embeddings: Tensor, count: int, generator: torch.Generator) -> None:
        """Put ``count`` randomly picked rows of ``embeddings`` at the front, dropping the oldest."""
        n = min(count, len(embeddings), self.length)
        if n == 0:
            return
        pick = torch.randperm(len(embeddings), generator=generator)[:n].to(embeddings.device)
        self.items[g] = torch.cat([embeddings[pick], self.items[g, : self.length - n]])


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """start -> end along half a cosine over ``total`` steps."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def foreground_masks(attention: Tensor, mode: str, mass: float) -> Tensor | None:
    """The loss mask of §1.4 from B x h x w attention: fg, its complement (bg), or None (all)."""
    if mode == "all":
        return None
    fg = mass_foreground(attention, mass)
    return fg if mode == "fg" else ~fg


def leopart_loss(
    student_views: list[Tensor],
    targets: list[Tensor],
    masks: list[Tensor | None],
    gc: Tensor,
    all_boxes: Tensor,
    patch: int,
    temperature: float,
    roi_size: int = 7,
) -> Tensor:
    """Spec §1.6-1.7. student_views[v]: B x K x h_v x w_v scores of view v; targets[g]: B x K x h x w
    Sinkhorn assignments of global crop g; masks[g]: B x h x w loss mask or None ('all'); gc: B x G x V x 4,
    all_boxes: B x V x G x 4 (pixels of the resized crops)."""
    num_global, views = len(targets), len(student_views)
    total = student_views[0].new_zeros(())
    for g in range(num_global):
        with torch.no_grad():
            q = align(targets[g].float(), gc[:, g] / patch, roi_size)
            m = None
            if masks[g] is not None:
                # a cell counts only if every sampled neighbour is foreground (tolerance for RoI rounding)
                m = align(masks[g].float()[:, None], gc[:, g] / patch, roi_size)[:, :, 0] >= 1 - 1e-6
        for v in range(views):
            if v == g:
                continue
            p = align(student_views[v].float(), all_boxes[:, v, g : g + 1] / patch, roi_size)[:, 0]
            log_p = F.log_softmax(p / temperature, dim=1)
            total = total + masked_cross_entropy(q[:, v], log_p, None if m is None else m[:, v])
    return total / (views - 1) / num_global


# ----------------------------------------------------------------------------- training


def _param_groups(model: nn.Module, p: FinetuneParams) -> list[dict]:
    groups = {(part, decay): [] for part in ("backbone", "head") for decay in (True, False)}
    for name, param in model.named_parameters():
        part = "backbone" if name.startswith("encoder.") else "head"
        decay = not (name.endswith(".bias") or param.ndim == 1)
        groups[(part, decay)].append(param)
    lrs = {"backbone": p.lr_backbone, "head": p.lr_head}
    return [
        {"params": params, "lr": lrs[part], "base_lr": lrs[part], "decay": decay, "weight_decay": 0.0}
        for (part, decay), params in groups.items() if params
    ]


class Trainer:
    """The state and the step of one fine-tuning run (exposed for tests and benchmarks)."""

    def __init__(self, backbone: str, weights: str, p: FinetuneParams, total_steps: int, dist: Dist, **options):
        self.p, self.dist, self.total_steps = p, dist, total_steps
        self.patch = get_spec(backbone).stride
        check_params(p, self.patch)
        device = dist.device
        encoder = build_vit_model(backbone, weights, device, trainable=True, drop_path_rate=p.drop_path, **options)
        gen = torch.Generator().manual_seed(p.seed)
        self.student = LeopartNet(encoder, p, gen).to(device)
        self.teacher = None
        if p.use_teacher:
            # same backbone init, its own random head (Ref initialises the two heads independently)
            teacher_encoder = build_vit_model(backbone, weights, device, trainable=False, drop_path_rate=0.0, **options)
            self.teacher = LeopartNet(teacher_encoder, p, gen).to(device).requires_grad_(False).eval()
        self.model = dist.wrap(self.student)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student, p))
        self.queue = Queue(p.num_global, p.queue_length // dist.world_size, p.projection_dim).to(device)
        self.generator = torch.Generator().manual_seed(p.seed + 1)

    def state(self) -> dict:
        state = {"student": self.student, "optimizer": self.optimizer, "queue": self.queue,
                 "generator": GeneratorState(self.generator)}
        if self.teacher is not None:
            state["teacher"] = self.teacher
        return state

    def _autocast(self):
        enabled = self.p.amp and self.dist.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def _schedules(self, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_schedule(group["base_lr"], 0.0, step, self.total_steps)
            wd = cosine_schedule(self.p.weight_decay_start, self.p.weight_decay_end, step, self.total_steps)
            group["weight_decay"] = wd if group["decay"] else 0.0
        return cosine_schedule(self.p.momentum_start, 1.0, step, self.total_steps)

    @torch.no_grad()
    def _targets(self, globals_: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        p, g_count, bs = self.p, globals_.shape[0], globals_.shape[1]
        source = self.teacher if self.teacher is not None else self.student
        with self._autocast():
            scores, z, attn = source.targets_forward(globals_.flatten(0, 1), attention=p.loss_mask != "all")
        scores, z = scores.float(), z.float()
        h, w = scores.shape[-2:]
        targets, masks = [], []
        for g in range(g_count):
            s = scores[g * bs : (g + 1) * bs].permute(0, 2, 3, 1).reshape(-1, p.num_prototypes)
            mask = None if attn is None else foreground_masks(attn[g * bs : (g + 1) * bs], p.loss_mask, p.mask_mass)
            rows = s
            if self.queue.full(g):
                # queued teacher embeddings, scored with the student's prototypes (Ref)
                rows = torch.cat([self.queue.items[g] @ self.student.prototypes.weight.T, s])
            q = sinkhorn(rows, p.epsilon, p.sinkhorn_iterations, self.dist)[-len(s):]
            targets.append(q.reshape(bs, h, w, -1).permute(0, 3, 1, 2))
            masks.append(mask)
            if self.queue.length:
                # only the tokens the loss looks at (the foreground, by default) enter the queue
                emb = z[g * bs : (g + 1) * bs].permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                if mask is not None:
                    emb = emb[mask.reshape(-1).to(emb.device)]
                self.queue.push(g, emb, 10 * bs, self.generator)
        return targets, masks

    def step(self, step: int, batch: dict[str, Tensor]) -> dict[str, float]:
        p, device = self.p, self.dist.device
        momentum = self._schedules(step)
        self.student.normalize_prototypes()
        if self.teacher is not None:
            self.teacher.normalize_prototypes()
        globals_, locals_ = batch["globals"].to(device), batch["locals"].to(device)
        gc, all_boxes = batch["gc"].to(device), batch["all"].to(device)
        g_count, bs = globals_.shape[:2]
        targets, masks = self._targets(globals_)
        self.student.train()
        groups = [globals_.flatten(0, 1)] + ([locals_.flatten(0, 1)] if p.num_local else [])
        with self._autocast():
            outputs = self.model(groups)
        views = [outputs[0][g * bs : (g + 1) * bs] for g in range(g_count)]
        if p.num_local:
            views += [outputs[1][i * bs : (i + 1) * bs] for i in range(p.num_local)]
        loss = leopart_loss(views, targets, masks, gc, all_boxes, self.patch, p.temperature, p.roi_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            with torch.no_grad():
                teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
                torch._foreach_mul_(teacher, momentum)
                torch._foreach_add_(teacher, student, alpha=1 - momentum)
        return {"loss": float(self.dist.all_reduce_mean(loss.detach())), "images": bs * self.dist.world_size}


def _is_finetune_dir(out: Path) -> bool:
    """A folder written by ``finetune``: its finetune.yaml names a backbone and the fine-tuning params."""
    try:
        data = load_yaml(out / CONFIG)
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    return {"backbone", "params", "total_steps"} <= data.keys()


def _discard(out: Path) -> None:
    """Delete what a fine-tuning wrote into ``out`` (its settings, checkpoints, weights) and nothing else."""
    previous = load_yaml(out / CONFIG).get("backbone")
    own = [CONFIG] + ([f"{previous}-leopart.safetensors"] if isinstance(previous, str) and "/" not in previous else [])
    for name in own:
        (out / name).unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _prepare_out(out: Path, settings: dict, overwrite: bool, weights_file: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not _is_finetune_dir(out):
            raise RunDirError(f"{out} is not empty and is not a fine-tuning folder (no {CONFIG}); overwrite only "
                              "replaces fine-tuning folders, so nothing was deleted: choose another --out")
        if overwrite:
            _discard(out)
        elif weights_file.exists():
            raise RunDirError(
                f"{out} already holds a finished fine-tuning ({weights_file.name}); "
                "pass overwrite / --overwrite or choose another --out"
            )
        elif load_yaml(out / CONFIG) != settings:
            raise RunDirError(
                f"{out} holds an unfinished fine-tuning with other settings; "
                "pass overwrite / --overwrite or choose another --out"
            )
        else:
            return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG, dump_yaml(settings))


# the reference's images per step over its 2 GPUs (train_coco_config: 32 each; ViT-B/8 config: 16 each)
REFERENCE_BATCH = {"dino_vitb8": 2 * 16}
DEFAULT_BATCH = 2 * 32


def reference_batch_size(backbone: str) -> int:
    """The reference's effective (all-GPU) batch for ``backbone``."""
    return REFERENCE_BATCH.get(backbone, DEFAULT_BATCH)


def finetune(
    backbone: str,
    images: str | os.PathLike,
    out: str | os.PathLike,
    weights: str = "auto",
    epochs: int = 50,
    batch_size: int | None = None,
    steps: int | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    **params,
) -> Path:
    """Fine-tune ViT ``backbone`` (weights "auto", "random" or a file) with Leopart on the images
    under ``images``; returns ``<out>/<backbone>-leopart.safetensors`` (student ViT, timm names).

    ``epochs`` x (images // batch_size) steps, or exactly ``steps`` when given (the schedules span
    them). ``batch_size`` None: the reference's effective batch (``reference_batch_size``). ``params``
    are FinetuneParams fields (num_prototypes=300, loss_mask="fg", lr_backbone=1e-5, seed=400,
    workers=4, ...); ``device`` auto | cpu | cuda[:N].
    """
    log = log or print
    p = from_dict(FinetuneParams, params, "finetune")
    spec = get_spec(backbone)
    if spec.family == "efficientnet":
        raise ConfigError(f"Leopart fine-tunes ViT backbones; {backbone!r} is a CNN")
    check_params(p, spec.stride)
    batch_size = reference_batch_size(backbone) if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1 or (steps is not None and steps < 1):
        raise ConfigError(f"epochs, batch_size and steps must be >= 1, got {epochs}, {batch_size}, {steps}")
    dist = init_distributed(device)
    dist.shard(batch_size)   # batch_size must split evenly over the processes
    data = ImageFolder(images)
    steps_per_epoch = len(data) // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {batch_size} is larger than the {len(data)} images in {images}")
    total = steps if steps is not None else epochs * steps_per_epoch
    out = Path(out)
    weights_file = out / f"{backbone}-leopart.safetensors"
    settings = {"backbone": backbone, "weights": str(weights), "images": str(Path(images).resolve()),
                "fingerprint": data.fingerprint(), "batch_size": batch_size, "total_steps": total,
                "world_size": dist.world_size, "params": to_dict(p)}
    if dist.is_main:
        _prepare_out(out, settings, overwrite, weights_file)
    dist.barrier()
    torch.manual_seed(p.seed + dist.rank)   # drop-path masks differ per process, as in DDP training
    trainer = Trainer(backbone, weights, p, total, dist)
    shard = dist.shard(batch_size)

    def load(indices: list[int], epoch: int) -> dict[str, Tensor]:
        return collate([make_views(data[i].image, p, np.random.default_rng([p.seed, epoch, i])) for i in indices])

    pool = ThreadPoolExecutor(max_workers=max(p.workers, 1))

    def batches(epoch: int):
        order = np.random.default_rng([p.seed, epoch]).permutation(len(data))
        chunks = [order[s * batch_size : (s + 1) * batch_size][shard].tolist() for s in range(steps_per_epoch)]
        loader = _Prefetcher(partial(load, epoch=epoch), chunks, pool, depth=2)
        return (partial(loader.get, i) for i in range(len(chunks)))

    stage = Stage("leopart-finetune", total, steps_per_epoch, batches, lambda step, get: trainer.step(step, get()),
                  trainer.state(), p.checkpoint_every)
    log(f"leopart fine-tuning {backbone}: {len(data)} images, {total} steps of {batch_size} images")
    try:
        run_stage(stage, out / CHECKPOINTS, dist, log)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if dist.is_main:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in trainer.student.encoder.model.state_dict().items()}
        with atomic_path(weights_file) as tmp:
            save_file(tensors, str(tmp), metadata={"backbone": backbone, "method": "leopart"})
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        log(f"fine-tuned {backbone} written to {weights_file}")
    dist.barrier()
    return weights_file
