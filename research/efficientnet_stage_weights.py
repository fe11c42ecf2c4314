"""k-means on CamVid with the EfficientNet-Lite stages weighted: which stages carry the classes.

The embedded backbones' features are three L2-normalised maps (strides 8, 16, 32) concatenated; the
cosine k-means baseline therefore weighs them equally. Here each stage's slice of the cached features
is multiplied by a weight (0 drops it) before the `kmeans` method's own steps (the same token sample,
spherical k-means, cosine scores bilinearly upsampled); val is scored by one Hungarian matching over
the split, no flip (a proxy of `evaluate`, about 0.3 below it for the equal weights).

    python research/efficientnet_stage_weights.py RUN --root DATA/camvid 1,1,1 0,1,1 1,1,0 0.5,1,1

RUN is a k-means CamVid run (its config gives backbone, resolution, K and k-means parameters).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import unsupseg
from unsupseg.api.resolve import _train_preprocess
from unsupseg.data import build_dataset
from unsupseg.engine import init_distributed
from unsupseg.evaluation.metrics import ConfusionMatrix, score
from unsupseg.features.clustering import gather_tokens, spherical_kmeans
from unsupseg.features.extract import extract_features
from unsupseg.features.source import open_features

STAGES = {"efficientnet_lite0": (40, 112, 320), "efficientnet_lite1": (40, 112, 320),
          "efficientnet_lite2": (48, 120, 352)}


def weighted(maps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return maps.float() * scale.view(-1, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("weights", nargs="+", help="stage weights s8,s16,s32")
    ap.add_argument("--root", required=True)
    args = ap.parse_intermixed_args()
    seg = unsupseg.load(args.run)
    cfg, net, p = seg.config, seg.backbone, seg.params
    train = build_dataset("camvid", args.root, "train")
    store, _ = open_features(net, train, _train_preprocess(cfg, net.stride), cache="auto", cache_dir=cfg.cache_dir,
                             max_gb=100, batch_size=8, flip=False, strict=False, workers=None,
                             dist=init_distributed("cpu"), log=print, warn=print, description="train")
    val = build_dataset("camvid", args.root, "val")
    vstore = extract_features(net, val, seg.eval_preprocess(val), cache_dir=cfg.cache_dir, batch_size=8, strict=True)
    sizes = STAGES[cfg.backbone.name]
    for text in args.weights:
        w = [float(x) for x in text.split(",")]
        scale = torch.cat([torch.full((n,), x) for n, x in zip(sizes, w)])
        keep = scale > 0

        class Weighted:   # the store's interface that gather_tokens reads, with the weights applied
            shapes = store.shapes

            def __len__(self):
                return len(store)

            def __getitem__(self, i):
                return weighted(store[i], scale)[keep]

        tokens = gather_tokens(Weighted(), p.max_samples, torch.Generator().manual_seed(cfg.seed * 1000 + 1))
        centroids = spherical_kmeans(tokens, cfg.clusters, torch.Generator().manual_seed(cfg.seed * 1000 + 2),
                                     restarts=p.restarts, iterations=p.iterations, tolerance=p.tolerance)
        conf = ConfusionMatrix(cfg.clusters, val.num_classes)
        for i in range(len(vstore)):
            emb = F.normalize(weighted(vstore[i], scale)[keep][None], dim=1)
            scores = torch.einsum("bdhw,kd->bkhw", emb, centroids)
            label = vstore.label(i)
            pred = F.interpolate(scores, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            conf.update(pred, label)
        result = score(conf, "hungarian")
        print(f"stage weights {text}: mIoU {result.miou:.1f}, pixel accuracy {result.pixel_accuracy:.1f}", flush=True)


if __name__ == "__main__":
    main()
