"""Leopart's label-free merge on CamVid: how the part-cluster graph and community detection move val mIoU.

For each seed, the fit's part clusters are computed once, exactly as `fit` computes them (float64 PCA
tokens, K_cd k-means with the run's generator), and saved in OUT; each merge variant then builds its graph
from the train label maps, runs Infomap, and scores the resulting part -> community table on val: token
maps nearest-upsampled to the label size, one Hungarian matching over the split, no flip. That is a
proxy of `evaluate` (which averages the flipped image and upsamples bilinearly), close enough to rank
variants in seconds instead of a fit and an evaluation each. The "oracle" line maps each part to its
majority val class, the ceiling of any merge of these parts.

    python research/leopart_merge_sweep.py RUN --root DATA/camvid --seeds 0,1,2 --out /tmp/leopart-sweep \
        '{}' '{"power": 2, "wt": 0.01}' '{"modules": 20}'

RUN is a Leopart CamVid run (its config gives backbone, resolution, PCA and K_cd); each variant is a
JSON object of `merge` arguments; every variant runs with two Infomap seeds per fit seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import unsupseg
from unsupseg.api.resolve import _train_preprocess
from unsupseg.data import build_dataset
from unsupseg.engine import init_distributed
from unsupseg.evaluation.metrics import ConfusionMatrix, score
from unsupseg.features.clustering import assign, kmeans
from unsupseg.features.extract import extract_features
from unsupseg.features.source import iter_maps, open_features
from unsupseg.methods.leopart.foreground import resize_nearest
from unsupseg.methods.leopart.merge import (
    build_graph,
    community_table,
    cooccurrence,
    detect_communities,
    limit_communities,
)
from unsupseg.methods.leopart.tokens import fit_stable_pca, pca_tokens


def part_clusters(run: str, root: str, seeds: list[int], k_cd: int | None, out: Path) -> dict[int, dict]:
    seg = unsupseg.load(run)
    cfg, net, p = seg.config, seg.backbone, seg.params
    k_cd = k_cd or p.k_cd
    missing = [s for s in seeds if not (out / f"s{s}_k{k_cd}.pt").exists()]
    if missing:
        train = build_dataset("camvid", root, "train")
        store, _ = open_features(net, train, _train_preprocess(cfg, net.stride), cache="auto", cache_dir=cfg.cache_dir,
                                 max_gb=100, batch_size=8, flip=False, strict=False, workers=None,
                                 dist=init_distributed("cpu"), log=print, warn=print, description="train")
        val = build_dataset("camvid", root, "val")
        vstore = extract_features(net, val, seg.eval_preprocess(val), cache_dir=cfg.cache_dir, batch_size=8,
                                  strict=True)
        pca = fit_stable_pca(lambda: (m.flatten(1).T for _, m in iter_maps(store)), p.pca_dim)
        tokens = torch.cat([pca_tokens(pca, m.flatten(1).T) for _, m in iter_maps(store)])
        shapes = [tuple(s[1:]) for s in store.shapes]
        for seed in missing:
            g = torch.Generator().manual_seed(seed * 1000 + 2)   # the fit's ctx.generator(2)
            c = kmeans(tokens, k_cd, spherical=False, generator=g, iterations=p.kmeans_iterations,
                       restarts=p.kmeans_restarts, points_per_centroid=p.points_per_centroid).float()
            lab = assign(tokens, c, spherical=False)[0]
            tr = [m.reshape(h, w) for m, (h, w) in zip(lab.split([h * w for h, w in shapes]), shapes)]
            va = [assign(pca_tokens(pca, vstore[i].flatten(1).T), c, spherical=False)[0].reshape(vstore.shapes[i][1:])
                  for i in range(len(vstore))]
            gt = [vstore.label(i) for i in range(len(vstore))]
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"train": tr, "val": va, "val_gt": gt, "centroids": c}, out / f"s{seed}_k{k_cd}.pt")
    return {s: torch.load(out / f"s{s}_k{k_cd}.pt", weights_only=True) for s in seeds}


def val_miou(d: dict, table: torch.Tensor, clusters: int = 11) -> float:
    conf = ConfusionMatrix(int(table.max()) + 1 if clusters is None else clusters, 11)
    for va, gt in zip(d["val"], d["val_gt"]):
        conf.update(F.interpolate(table[va][None, None].float(), size=gt.shape, mode="nearest")[0, 0].long(), gt)
    return score(conf, "hungarian").miou


def merge(d: dict, seed: int, power: float = 1.0, wt: float = 0.02, mt: float = 1.0, trials: int = 10,
          map_size: int | None = 100, modules: int | None = None, label0: bool = True, consensus: int = 0,
          clusters: int = 11) -> tuple[float, int]:
    """The fit's merge with its knobs exposed: graph = co-occurrence x cosine^power (power 0: plain
    co-occurrence); ``modules`` asks Infomap for that many communities before merging down to ``clusters``;
    ``label0=False`` gives all labels to communities even when parts are left out of the graph;
    ``consensus=R`` runs R single-trial Infomaps and detects communities on how often two parts shared one."""
    k = len(d["centroids"])
    n = k + 1
    maps = [resize_nearest(m, map_size) if map_size else m for m in d["train"]]
    a = cooccurrence(maps, n)
    if power:
        unit = F.normalize(d["centroids"].double(), dim=1)
        sim = torch.ones_like(a)
        sim[:k, :k] = (unit @ unit.T).clamp_min(0) ** power
        a = a * sim
    sizes = torch.bincount(torch.cat([m.reshape(-1) for m in maps]), minlength=n).double()
    edges = build_graph(a, wt)
    in_graph = torch.zeros(n, dtype=torch.bool)
    for i, j, _ in edges:
        in_graph[i] = in_graph[j] = True
    left_out = bool(((sizes > 0) & ~in_graph).any()) and label0
    number = clusters - 1 if left_out else clusters
    if consensus:
        together = torch.zeros(n, n, dtype=torch.float64)
        for r in range(consensus):
            ids = torch.full((n,), -1)
            for node, module in detect_communities(edges, number, backend="infomap", markov_time=mt,
                                                   seed=seed * 1000 + r + 1).items():
                ids[node] = module
            together += ((ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)).double() / consensus
        edges = build_graph(together, 1e-9)
    found = detect_communities(edges, modules or number, backend="infomap", markov_time=mt, seed=seed + 1,
                               trials=trials)
    table = community_table(n, limit_communities(found, edges, number, sizes))
    if not left_out:
        table = (table - 1).clamp_min(0)
    return val_miou(d, table, clusters), len(set(found.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("variants", nargs="*", default=["{}"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k-cd", type=int, help="part clusters (default: the run's params.k_cd)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the part clusters (reused)")
    args = ap.parse_intermixed_args()
    data = part_clusters(args.run, args.root, [int(s) for s in args.seeds.split(",")], args.k_cd, args.out)
    for s, d in data.items():
        conf = ConfusionMatrix(len(d["centroids"]) + 1, 11)
        for va, gt in zip(d["val"], d["val_gt"]):
            conf.update(F.interpolate(va[None, None].float(), size=gt.shape, mode="nearest")[0, 0].long(), gt)
        oracle = val_miou(d, torch.as_tensor(conf.matrix.argmax(1)))
        print(f"seed {s}: oracle (each part to its majority val class) {oracle:.1f}")
    for text in args.variants:
        runs = [merge(d, s + 100 * r, **json.loads(text)) for s, d in data.items() for r in range(2)]
        scores = [m for m, _ in runs]
        print(f"{text}: mean {sum(scores) / len(scores):.2f} mIoU ({' '.join(f'{m:.1f}' for m in scores)}; "
              f"Infomap found {[f for _, f in runs]})", flush=True)


if __name__ == "__main__":
    main()
