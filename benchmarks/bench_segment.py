"""Benchmark of ``unsupseg.segment`` over a large folder: throughput and memory over time.

Writes ``--n`` synthetic photos (default 2000; sides drawn uniformly in [--min-side, --max-side],
coloured rectangles over smooth noise, JPEG) to a temporary folder, fits a tiny k-means run on the
first few of them (default backbone efficientnet_lite0, the kmeans default preset's 320 px), then
segments the whole folder with ``unsupseg.segment(run, [folder], out)`` (one image at a time: mask
PNG + overlay JPEG per image) and prints

  - images per second and megapixels per second over the segment call (after loading the run),
  - peak RSS of the process (``resource.getrusage``: includes the image generation and the fit),
  - RSS sampled by a background thread (``VmRSS`` of /proc/self/status) before segmenting and
    when 10 %, 50 % and 100 % of the images are done, and the highest sample during the call:
    memory should stay flat, since segment holds one image at a time.

Progress is read from the number of overlays written so far (each is renamed into place last).

    python benchmarks/bench_segment.py                 # 2000 images
    python benchmarks/bench_segment.py --n 200 --threads 2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, min_side: int, max_side: int, seed: int) -> float:
    """``n`` JPEG photos of random sizes; returns their total megapixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    megapixels = 0.0
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        # smooth noise (upsampled from a coarse grid, cheap) under a few flat rectangles
        coarse = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8))
        img = np.array(coarse.resize((w, h), Image.BILINEAR))
        for _ in range(rng.integers(2, 6)):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            y1, x1 = y0 + rng.integers(8, h - y0 + 1), x0 + rng.integers(8, w - x0 + 1)
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"photo_{i:05d}.jpg", quality=90)
        megapixels += w * h / 1e6
    return megapixels


def vm_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


class RssSampler(threading.Thread):
    """Samples (seconds, RSS MiB, images done) every ``interval`` until stopped."""

    def __init__(self, out_dir: Path, interval: float):
        super().__init__(daemon=True)
        self.out_dir, self.interval = out_dir, interval
        self.samples: list[tuple[float, float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def done(self) -> int:
        if not self.out_dir.is_dir():
            return 0
        with os.scandir(self.out_dir) as entries:
            return sum(1 for e in entries if e.name.endswith("_overlay.jpg") and not e.name.startswith("."))

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self._t0, vm_rss_mib(), self.done()))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()   # the final state, after the last image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of images in the folder")
    parser.add_argument("--min-side", type=int, default=320)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--fit-images", type=int, default=8, help="images the tiny k-means run is fitted on")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and outputs here")
    parser.add_argument("--progress", action="store_true", help="show the progress bar")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.progress:
        os.environ["UNSUPSEG_PROGRESS"] = "0"

    import torch

    import unsupseg

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        work = args.workdir or Path(tmp)
        images, fit_images, out = work / "images", work / "fit-images", work / "out"

        tic = time.perf_counter()
        megapixels = make_images(images, args.n, args.min_side, args.max_side, args.seed)
        print(f"generated {args.n} images ({megapixels:.0f} Mpx, sides {args.min_side}-{args.max_side}) "
              f"in {time.perf_counter() - tic:.1f} s")

        fit_images.mkdir(parents=True, exist_ok=True)
        for p in sorted(images.iterdir())[: args.fit_images]:
            shutil.copy(p, fit_images / p.name)
        tic = time.perf_counter()
        unsupseg.fit(
            "kmeans", images=fit_images, out=work / "run", clusters=args.clusters, backbone=args.backbone,
            overrides=["params.restarts=1", f"cache_dir={work / 'cache'}"], overwrite=True, log=lambda m: None,
        )
        seg = unsupseg.load(work / "run")
        print(f"fitted and loaded k-means (K={args.clusters}, {args.fit_images} images, {seg.resolution} px, "
              f"flip {'on' if seg.config.test.flip else 'off'}) in {time.perf_counter() - tic:.1f} s; "
              f"torch threads {torch.get_num_threads()}")

        sampler = RssSampler(out, args.interval)
        sampler.sample()
        before = sampler.samples[0][1]
        sampler.start()
        tic = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = unsupseg.segment(seg, [images], out)
        elapsed = time.perf_counter() - tic
        sampler.stop()

        print(f"segmented {len(written)} images in {elapsed:.1f} s: {len(written) / elapsed:.2f} images/s, "
              f"{megapixels / elapsed:.2f} Mpx/s ({len(caught)} warnings)")
        print(f"RSS before segment: {before:.0f} MiB")
        for frac in (0.1, 0.5, 1.0):
            need = max(1, int(np.ceil(frac * args.n)))
            hit = next(((t, rss, d) for t, rss, d in sampler.samples if d >= need), None)
            if hit is None:
                print(f"RSS after {frac:>4.0%} of images: not reached")
            else:
                print(f"RSS after {frac:>4.0%} of images: {hit[1]:.0f} MiB ({hit[2]} done, t={hit[0]:.1f} s)")
        during = [rss for _, rss, _ in sampler.samples[1:]]
        print(f"RSS sampled during segment: max {max(during):.0f} MiB, min {min(during):.0f} MiB "
              f"over {len(during)} samples")
        # ru_maxrss is in KiB on Linux
        print(
            f"peak RSS of the process (getrusage): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
