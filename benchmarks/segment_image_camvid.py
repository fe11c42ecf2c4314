"""segment-image on five CamVid val frames, scored per image, beside a dataset-trained run.

    python benchmarks/segment_image_camvid.py --root DATA/camvid --run runs/cause-mlp-s0 \
        --out outputs/segment-image-camvid [--clusters auto|N] [--resolution 360]

Five frames spread over the val split (its frames come from video sequences): each is partitioned
from its own features (``unsupseg.segment_image``, CRF on), and segmented by the run (its own test
recipe, CRF as the run says). Both are scored by the per-image Hungarian protocol (the one
``unsupseg evaluate --matching per-image`` uses) over the five frames; per frame, its own mIoU under
that protocol is printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

import unsupseg
from unsupseg.data import build_dataset
from unsupseg.evaluation.metrics import PerImageHungarian, image_confusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--clusters", default="auto")
    parser.add_argument("--resolution", type=int, default=360)
    parser.add_argument("--frames", type=int, default=5)
    args = parser.parse_args()
    clusters = int(args.clusters) if args.clusters.isdigit() else args.clusters
    data = build_dataset("camvid", args.root, "val")
    chosen = sorted({int(round(i)) for i in np.linspace(0, len(data) - 1, args.frames)})
    run = unsupseg.load(args.run)
    totals = {"segment-image": PerImageHungarian(data.num_classes), "run": PerImageHungarian(data.num_classes)}
    print("| frame | segment-image K | segment-image mIoU | run mIoU | segment-image s |")
    print("|---|---|---|---|---|")
    for i in chosen:
        sample = data[i]
        path = Path(args.root) / "val" / f"{sample.id}.png"
        tic = time.perf_counter()
        seg = unsupseg.segment_image(path, args.out / sample.id, clusters=clusters, resolution=args.resolution,
                                     overwrite=True, log=lambda m: None)
        seconds = time.perf_counter() - tic
        mine = np.asarray(Image.open(args.out / sample.id / f"{sample.id}.png")).astype(np.int64)
        theirs = run.predict(path)
        row = []
        for name, pred, k in (("segment-image", mine, seg.num_clusters), ("run", theirs, run.num_clusters)):
            m = image_confusion(pred, sample.label, k, data.num_classes)
            one = PerImageHungarian(data.num_classes)
            one.add(m)
            totals[name].add(m)
            row.append(one.scores().miou)
        print(f"| {sample.id} | {seg.num_clusters} | {row[0]:.1f} | {row[1]:.1f} | {seconds:.0f} |")
    s, r = totals["segment-image"].scores(), totals["run"].scores()
    print(f"| all {len(chosen)} (per-image protocol) | | {s.miou:.1f} (acc. {s.pixel_accuracy:.1f}) "
          f"| {r.miou:.1f} (acc. {r.pixel_accuracy:.1f}) | |")


if __name__ == "__main__":
    main()
