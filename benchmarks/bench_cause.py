"""CAUSE training throughput and peak memory, per step (1 clusterbook, 2 front door, 3 cluster probe),
with the feature cache (what ``fit`` does) and without it (the frozen backbone runs on every batch).

    python benchmarks/bench_cause.py --variant mlp --steps 5 --preset camvid
    python benchmarks/bench_cause.py --variant tr --device cuda --preset cocostuff27 --backbone dino_vits8

Images are random (throughput does not depend on content); the backbone is randomly initialised
unless --weights is given. Prints images/s per step and peak memory: CUDA max_memory_allocated on a
GPU; on CPU the process's peak resident memory during the measured steps (Linux: VmHWM, reset
before each measurement through /proc/self/clear_refs; elsewhere getrusage's peak over the whole
run). tracemalloc is no use here: it does not see tensor memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from unsupseg.api import resolve_config
from unsupseg.backbones import build_backbone
from unsupseg.engine import Dist
from unsupseg.features.cache import open_or_build
from unsupseg.methods.cause.params import Params
from unsupseg.methods.cause.trainer import StoreSource, cluster_stage, front_door_stage, mediator_stage


class BackboneSource:
    """Batches computed by the backbone from the images at every step: no feature cache."""

    def __init__(self, backbone, images: torch.Tensor, device):
        self.backbone, self.images, self.device = backbone, images, device
        self.labelled = False
        with torch.no_grad():
            probe = backbone(images[:1].to(device))
        self.dim, self.grid = probe.shape[1], tuple(probe.shape[-2:])

    def __len__(self) -> int:
        return len(self.images)

    def load(self, batch, shard):
        return self.backbone(self.images[batch[shard]].to(self.device)).cpu(), None


def cached_source(backbone, images: torch.Tensor, device, folder: Path) -> StoreSource:
    def items():
        for i in range(len(images)):
            yield str(i), backbone(images[i : i + 1].to(device))[0].cpu(), None

    return StoreSource(open_or_build(folder, {"bench": str(images.shape)}, items), labelled=False)


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(stage, steps: int, device) -> tuple[float, str]:
    """images/s over ``steps`` steps after one warm-up step, and the peak memory of those steps."""
    batches = stage.batches(0)
    stage.step(0, batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    images, tic = 0, time.perf_counter()
    for i in range(1, steps + 1):
        images += int(stage.step(i, batches[i % len(batches)])["images"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - tic
    if device.type == "cuda":
        memory = f"GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    else:
        memory = f"peak RSS {peak_rss_mib():.0f} MiB"
    return images / elapsed, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("mlp", "tr"), default="mlp")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="camvid", help="preset whose params are used (camvid, cocostuff27, ...)")
    parser.add_argument("--backbone", default=None, help="backbone name (default: the preset's)")
    parser.add_argument("--weights", default="random", help="backbone weights: random (default), auto or a file")
    parser.add_argument("--resolution", type=int, default=None, help="square input side (default: the preset's)")
    parser.add_argument("--images", type=int, default=None, help="number of random images (default: 2 batches)")
    parser.add_argument("--no-cache-run", action="store_true", help="skip the measurements without the feature cache")
    args = parser.parse_args()

    method = f"cause-{args.variant}"
    config = resolve_config(method, preset=args.preset)
    params = Params(**config.params)
    params.ref_world_size = 1
    device = torch.device(args.device)
    backbone = build_backbone(args.backbone or config.backbone.name, args.weights, device=device)
    side = args.resolution or params.train_resolution or config.data.resolution
    side -= side % backbone.stride
    count = args.images or 2 * params.batch_size
    images = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(0))
    print(
        f"CAUSE-{args.variant.upper()} preset {args.preset}: backbone {backbone.name} ({args.weights}), {count} images "
        f"{side}x{side}, batch {params.batch_size}, K {params.concepts}, P {params.projection_dim}, "
        f"bank {params.bank_size}, device {device}, threads {torch.get_num_threads()}"
    )
    dist = Dist(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"cache": cached_source(backbone, images, device, Path(tmp))}
        if not args.no_cache_run:
            sources["no cache"] = BackboneSource(backbone, images, device)
        for name, source in sources.items():
            torch.manual_seed(0)
            stage, mediator = mediator_stage(source, params, dist, 0, device)
            rate, memory = measure(stage, args.steps, device)
            print(f"step 1 clusterbook  [{name:8s}] {rate:8.1f} img/s  {memory}")
            stage, front = front_door_stage(
                source, mediator.codebook.detach(), args.variant, None, params, dist, 0, device
            )
            rate, memory = measure(stage, args.steps, device)
            print(
                f"step 2 front door   [{name:8s}] {rate:8.1f} img/s  {memory}  (bank {int(front.bank.length.sum())} "
                f"entries)"
            )
            stage, _ = cluster_stage(source, front.head_teacher, None, config.clusters, params, dist, 0, device)
            rate, memory = measure(stage, args.steps, device)
            print(f"step 3 cluster      [{name:8s}] {rate:8.1f} img/s  {memory}")


if __name__ == "__main__":
    main()
