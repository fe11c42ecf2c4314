"""STEGO speed and memory: training throughput, peak memory, kNN table build time.

    python benchmarks/bench_stego.py                       # CPU, CamVid-like maps (472 x 45 x 60)
    python benchmarks/bench_stego.py --device cuda --dim 768 --height 28 --width 28 --batch 32
    python benchmarks/bench_stego.py --knn 1000 10000 100000

Training runs the real STEGO training step (``unsupseg.methods.stego.build_training``) on a feature
cache of random maps: the backbone is frozen and never runs while STEGO trains, so the cache is all
the trainer sees. Prints images/s over the timed steps (after warm-up), process CPU seconds per step
(wall time on a shared machine is inflated by other jobs; CPU time is not), peak memory (process max
RSS on CPU; max allocated on CUDA), and the time of the exact chunked top-30 kNN search over N
random descriptors.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from unsupseg.backbones import build_backbone
from unsupseg.config import RunConfig, to_dict
from unsupseg.engine import Dist
from unsupseg.features.cache import open_or_build
from unsupseg.features.knn import knn_indices, pooled_descriptors
from unsupseg.methods import stego
from unsupseg.methods.base import FitContext


def random_store(folder: Path, n: int, dim: int, h: int, w: int, stride: int):
    gen = torch.Generator().manual_seed(0)

    def items():
        for i in range(n):
            yield (
                f"img{i}",
                torch.rand(dim, h, w, generator=gen),
                torch.randint(-1, 11, (h * stride, w * stride), generator=gen),
            )

    return open_or_build(folder, {"bench": "stego", "n": n, "dim": dim, "h": h, "w": w}, items)


def bench_training(args) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(Path(tmp), args.images, args.dim, args.height, args.width, 8)
        backbone = build_backbone("efficientnet_lite0", weights="random")   # only its stride is used
        params = stego.Params(dim=args.code_dim, batch_size=args.batch, crop=args.crop, linear_probe=not args.no_linear)
        config = RunConfig(method="stego", clusters=11, params=to_dict(params))
        ctx = FitContext(
            config, params, backbone, lambda **_: store, None, 11, Dist(device=device), None, lambda _: None
        )
        stage, _ = stego.build_training(ctx, store, knn_indices(pooled_descriptors(store), 30))
        batches = [b for epoch in range(args.warmup + args.steps) for b in stage.batches(epoch)][
            : args.warmup + args.steps
        ]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_times = []
        for i, batch in enumerate(batches):
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            stage.step(i, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append((time.perf_counter() - wall, time.process_time() - cpu))
        timed = step_times[args.warmup:]
        wall = sum(t for t, _ in timed)
        cpu = sum(c for _, c in timed)
        side = f"{args.crop}x{args.crop} crops of " if args.crop else ""
        print(
            f"training on {device}: batch {args.batch} ({side}{args.dim} x {args.height} x {args.width} maps + kNN "
            f"partners), "
            f"d = {args.code_dim}, linear probe {'off' if args.no_linear else 'on'}, torch threads "
            f"{torch.get_num_threads()}"
        )
        print(f"  {len(timed) * args.batch / wall:.1f} img/s, {wall / len(timed):.3f} s/step wall, "
              f"{cpu / len(timed):.3f} CPU s/step (process)")
        print(
            f"  peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB max RSS"
            + (f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA allocated" if device.type == "cuda" else "")
        )


def bench_knn(sizes: list[int], dim: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        desc = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
        wall, cpu = time.perf_counter(), time.process_time()
        knn_indices(desc, min(30, n), chunk)
        print(f"kNN top-30 of {n} images ({dim}-dim descriptors, chunk {chunk}): "
              f"{time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} CPU s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64, help="images in the synthetic feature cache")
    parser.add_argument("--dim", type=int, default=472, help="feature dim D (472 efficientnet_lite0, 384/768 DINO)")
    parser.add_argument("--height", type=int, default=45)
    parser.add_argument("--width", type=int, default=60)
    parser.add_argument("--code-dim", type=int, default=70)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--no-linear", action="store_true", help="no linear probe (unlabelled data)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--knn", type=int, nargs="*", default=[1000, 10000], help="N for the kNN build timing")
    parser.add_argument("--knn-dim", type=int, default=768)
    parser.add_argument("--knn-chunk", type=int, default=4096)
    args = parser.parse_args()
    bench_training(args)
    bench_knn(args.knn, args.knn_dim, args.knn_chunk)


if __name__ == "__main__":
    main()
