"""Does a CAUSE head separate a class, and does its cluster probe give that class a cluster? A labelled
diagnostic of finished runs (labels are read here only, never by a fit).

    python research/cause_head_classes.py RUN [RUN ...] [--every 4] [--classes car,road]

For every ``--every``-th training image it embeds the cached features with the run's test-time path
(TR: tiled windows), takes the label at each token's centre, and prints per class:
- separable: the share of the class's tokens whose nearest class mean (cosine, means computed from the
  labels) is their own: how well the head separates the class at all;
- cluster F1: the best F1 of any of the run's own clusters (its Step 3 probe) against the class: whether
  the probe gives the class a cluster of its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from cause_runs import load_cause_run

from unsupseg import api


def token_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B x H x W labels -> B x h x w, the label at each token's centre (-1: ignore)."""
    h, w = grid
    H, W = labels.shape[-2:]
    rows = ((torch.arange(h) + 0.5) * H / h).long()
    cols = ((torch.arange(w) + 0.5) * W / w).long()
    return labels[:, rows][:, :, cols]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--every", type=int, default=4, help="use every n-th training image")
    parser.add_argument("--classes", default="", help="comma-separated class names to print (default: all)")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be positive, got {args.every}")

    for path in args.runs:
        try:
            run, _, source, _ = load_cause_run(path)
        except ValueError as err:
            parser.error(str(err.args[0]))
        names = api.build_train_dataset(run.config).classes
        if names is None or source.store.label(0) is None:
            parser.error(f"{path}: its training set carries no labels")
        seg = api.load(path)
        embeddings, labels = [], []
        with torch.no_grad():
            for index in torch.arange(0, len(source), args.every).split(16):
                index = index.tolist()
                emb = seg._embed(source.store.batch(index).float())
                embeddings.append(F.normalize(emb.flatten(2).transpose(1, 2).flatten(0, 1), dim=1))
                labels.append(token_labels(source.store.labels(index), source.grid).flatten())
        x, y = torch.cat(embeddings), torch.cat(labels)
        keep = (y >= 0) & (y < len(names))
        x, y = x[keep], y[keep]
        present = [c for c in range(len(names)) if (y == c).any()]
        means = F.normalize(torch.stack([x[y == c].mean(0) for c in present]), dim=1)
        nearest = torch.tensor(present)[(x @ means.T).argmax(1)]
        own = seg.predictor.classify(x.T[None, :, :, None])[0, :, :, 0].argmax(0)
        wanted = [n for n in args.classes.split(",") if n] or names
        print(f"{path.name}: {len(x)} tokens of {len(range(0, len(source), args.every))} training images")
        for c in present:
            if names[c] not in wanted:
                continue
            member = y == c
            f1 = max(2 * (member & (own == k)).sum().item() / (member.sum().item() + (own == k).sum().item())
                     for k in own.unique().tolist())
            print(
                f"  {names[c]:>14}: separable {(nearest[member] == c).float().mean().item():.2f}, cluster F1 {f1:.2f}"
            )


if __name__ == "__main__":
    main()
