"""Benchmark of ``unsupseg.export`` beside ``unsupseg.segment``: throughput, and memory over a large folder.

1. CamVid val (``--run RUN --camvid ROOT``, a fitted run): segments the 101 val photos into a
   temporary folder (images/s of the segment call, after loading the run), then exports the masks
   in each format (images/s of each export call).
2. Synthetic (``--n`` masks, default 2000, 480 x 360, ``--classes`` blocky regions each): exports
   them in each format through ``unsupseg.exporters.export_masks`` (the masks are all an export reads)
   and prints the RSS (``VmRSS``) before and at 10 %, 50 % and 100 % of the images: it should stay
   flat, since an export holds one mask at a time and joins the JSON files streaming.

    python benchmarks/bench_export.py --run RUN --camvid /path/to/camvid
    python benchmarks/bench_export.py --n 2000          # synthetic part only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import unsupseg
from unsupseg.exporters import FORMATS, ExportItem, export_masks


def vm_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def camvid(run: Path, root: Path, tmp: Path) -> None:
    photos = root / "val"
    n = len(list(photos.glob("*.png")))
    seg = unsupseg.load(run)
    start = time.perf_counter()
    unsupseg.segment(seg, [photos], tmp / "masks")
    seconds = time.perf_counter() - start
    print(f"CamVid val, {n} photos, run {run}")
    print(f"  {'segment':<19} {n / seconds:7.2f} images/s  ({seconds:.1f} s)")
    for fmt in FORMATS:
        start = time.perf_counter()
        unsupseg.export(run, tmp / "masks", fmt, tmp / f"export-{fmt}")
        seconds = time.perf_counter() - start
        print(f"  export {fmt:<12} {n / seconds:7.2f} images/s  ({seconds:.1f} s)")


def synthetic(n: int, classes: int, tmp: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = tmp / "synthetic"
    folder.mkdir()
    items = []
    for i in range(n):
        coarse = rng.integers(0, classes, (9, 12), dtype=np.uint8)
        mask = np.asarray(Image.fromarray(coarse).resize((480, 360), Image.NEAREST))
        path = folder / f"m_{i:05d}.png"
        Image.fromarray(mask).save(path)
        items.append(ExportItem(path.stem, f"{path.stem}.jpg", path, None))
    names = [f"class_{k}" for k in range(classes)]
    print(f"synthetic: {n} masks of 480x360, {classes} classes; RSS in MiB")
    print(f"  {'format':<13} {'images/s':>9} {'before':>8} {'10 %':>8} {'50 %':>8} {'100 %':>8} {'joined':>8}")
    for fmt in FORMATS:
        samples: dict[str, float] = {}
        marks = {max(1, n // 10): "10 %", n // 2: "50 %", n: "100 %"}

        def track(seq, total, what):
            samples["before"] = vm_rss_mib()
            for done, item in enumerate(seq, 1):
                yield item
                if done in marks:
                    samples[marks[done]] = vm_rss_mib()

        start = time.perf_counter()
        export_masks(items, names, fmt, tmp / f"synthetic-{fmt}", identity={"masks": str(folder)}, track=track)
        seconds = time.perf_counter() - start
        samples["joined"] = vm_rss_mib()
        row = " ".join(f"{samples[k]:8.0f}" for k in ("before", "10 %", "50 %", "100 %", "joined"))
        print(f"  {fmt:<13} {n / seconds:9.1f} {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a fitted run (for the CamVid part)")
    parser.add_argument("--camvid", type=Path, help="CamVid root (holds val/)")
    parser.add_argument("--n", type=int, default=2000, help="synthetic masks (0: skip that part)")
    parser.add_argument("--classes", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None and args.camvid is not None:
            camvid(args.run, args.camvid, Path(tmp))
        if args.n:
            synthetic(args.n, args.classes, Path(tmp))


if __name__ == "__main__":
    main()
