"""Feature extraction speed of the embedded backbones on CamVid frames (360 x 480, the camvid presets'
resolution): images per second of the backbone forward, one image at a time, as `fit` on a cold cache
and `segment` run it on CPU.

    python benchmarks/bench_backbones.py --root DATA/camvid [--n 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from unsupseg.backbones import build_backbone
from unsupseg.data import build_dataset

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_dataset("camvid", args.root, "val")
    print(f"| backbone | dim | images/s ({args.n} CamVid val frames, 360 x 480, {args.threads} threads) |")
    print("|---|---|---|")
    names = args.backbones.split(",")
    nets = {name: build_backbone(name) for name in names}
    speed = {}
    # two rounds, the second reported: the first pays for thread-pool and kernel set-up, which a
    # single warm-up call per backbone does not cover (the first backbone measured came out ~40 % slow)
    for _ in range(2):
        for name in names:
            net = nets[name]
            prep = data.eval_preprocess(360, multiple=net.stride, interpolation="bilinear")
            images = [prep.apply(data[i].image)[0][None] for i in range(args.n)]
            with torch.inference_mode():
                net.extract(images[0])
                tic = time.perf_counter()
                for image in images:
                    net.extract(image)
                speed[name] = args.n / (time.perf_counter() - tic)
    for name in names:
        print(f"| {name} | {nets[name].dim} | {speed[name]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
