"""Paper scale simulated on a CPU: streamed features, crops on the fly, memory flat in the collection size.

A synthetic collection of small photos is written to a temporary folder, then CAUSE-MLP fits on its
five crops cut on the fly (``data.crop=five``), with the feature cache off (``data.cache=never``) and a
randomly initialised ViT-S/16, for a bounded number of steps (the schedule is scaled so every size runs
the same steps). Each configuration runs in a fresh process and reports:
  - disk written by the fit (``/proc/<pid>/io`` write_bytes of the process, and the cache folder),
  - peak resident memory of the fit process (ru_maxrss),
  - training items per second (Steps 1-3 items read / fit seconds).
Run at 1k and 10k images (the default), with 0 and 2 decode workers: peak memory stays flat
when the collection grows 10x, because nothing scales with it but the list of file names.

    python benchmarks/bench_paper_scale.py                 # 1,000 and 10,000 images, 0 and 2 workers
    python benchmarks/bench_paper_scale.py --images 2000 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 16


def write_collection(folder: Path, n: int, size=(96, 72), seed: int = 0) -> None:
    """``n`` small JPEG photos: a few random colour bands plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    w, h = size
    for i in range(n):
        img = np.empty((h, w, 3), np.uint8)
        cuts = np.sort(rng.integers(0, h, 3))
        for lo, hi in zip([0, *cuts], [*cuts, h]):
            img[lo:hi] = rng.integers(0, 256, 3)
        noise = rng.integers(-12, 13, img.shape)
        Image.fromarray(np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg")


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run_one(images: Path, workers: int, steps: int, work: Path) -> dict:
    """One fit in this process; returns its figures."""
    import torch

    from unsupseg import api

    torch.set_num_threads(1)
    n_images = sum(1 for _ in images.iterdir())
    items = 5 * n_images
    # epochs of `steps` batches, whatever the collection size (§7.1's ref_world_size sets the epoch)
    ref_world = max(1, items // (BATCH * steps))
    cache = work / "cache"
    os.environ["UNSUPSEG_CACHE_DIR"] = str(cache)
    before = written_bytes()
    tic = time.perf_counter()
    api.fit("cause-mlp", preset="demo", out=work / "run", images=images, clusters=5, backbone="dino_vits16",
            backbone_weights="random", log=lambda msg: None, overrides=[
                "data.crop=five", "data.cache=never", f"data.workers={workers}", "data.resolution=64",
                f"params.batch_size={BATCH}", f"params.ref_world_size={ref_world}", "params.mediator_epochs=1",
                "params.head_epochs=1", "params.cluster_epochs=1", "params.checkpoint_every=100000",
                "params.concepts=64", "params.projection_dim=128", "params.bank_size=20"])
    seconds = time.perf_counter() - tic
    per_epoch = max(1, items // (BATCH * ref_world))
    read = 3 * per_epoch * BATCH      # three stages of one epoch each
    return {
        "images": n_images,
        "items": items,
        "workers": workers,
        "steps_per_stage": per_epoch,
        "fit_seconds": round(seconds, 1),
        "items_per_second": round(read / seconds, 1),
        "disk_written_mb": round((written_bytes() - before) / 1e6, 2),
        "run_dir_mb": round(folder_bytes(work / "run") / 1e6, 2),
        "cache_bytes": folder_bytes(cache),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="largest collection (also run at a tenth)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per CAUSE stage")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--one", nargs=3, metavar=("IMAGES_DIR", "WORKERS", "WORK_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, workers, work = args.one
        print(json.dumps(run_one(Path(folder), int(workers), args.steps, Path(work))))
        return
    with tempfile.TemporaryDirectory(prefix="unsupseg-bench-") as tmp:
        tmp = Path(tmp)
        rows = []
        for n in (args.images // 10, args.images):
            tic = time.perf_counter()
            write_collection(tmp / f"images{n}", n)
            print(f"wrote {n} synthetic photos in {time.perf_counter() - tic:.0f} s", flush=True)
            for workers in args.workers:
                work = tmp / f"work{n}-{workers}"
                out = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--one", str(tmp / f"images{n}"),
                     str(workers), str(work)], check=True, capture_output=True, text=True,
                    env={**os.environ, "UNSUPSEG_PROGRESS": "0"})
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
        print()
        print("| images | items (5 crops) | decode workers | steps per stage | items/s | disk written | cache | "
              "peak RSS |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['images']:,} | {r['items']:,} | {r['workers']} | {r['steps_per_stage']} | "
                  f"{r['items_per_second']} | {r['disk_written_mb']} MB (run dir {r['run_dir_mb']} MB) | "
                  f"{r['cache_bytes']} B | {r['peak_rss_mb']} MB |")


if __name__ == "__main__":
    main()
