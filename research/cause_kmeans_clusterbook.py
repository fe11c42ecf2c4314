"""Does a CAUSE fit improve when its Step 1 clusterbook starts from k-means? Re-runs Steps 1-3 of a
finished run (its config and seed) with the clusterbook seeded by spherical k-means on the training
tokens, then scores a labelled split without and with the dense CRF.

    python research/cause_kmeans_clusterbook.py RUN --concepts 512 --dataset camvid --root DATA/camvid
    python research/cause_kmeans_clusterbook.py RUN --concepts 512 --step1-epochs 8 ...   # then modularity

Step 1 of a fit starts the clusterbook from U(-1/K, 1/K) and trains it by the modularity loss; on
CamVid fewer than 90 of its 512 concepts end up in use and pavement shares its concepts with road.
Here the clusterbook is spherical k-means (one run, 50 iterations, k-means++ seeds drawn from the
run's Step 1 generator) on the grid-sampled tokens of every training image, used as it is
(``--step1-epochs 0``) or trained from there by Step 1's modularity loss for that many epochs. Steps 2
and 3 then run exactly as in ``fit``. Prints the concepts in use (of the grid-sampled tokens' nearest
concepts), Step 1's objective on those tokens, pixel accuracy / mIoU (dataset-wide Hungarian) and the
IoU of each class. The run directory is not modified. Step 2's cost grows with the concepts in use
(the bank holds up to ``bank_size`` entries per concept).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cause_runs import load_cause_run, rerun_steps_2_3

from unsupseg import api
from unsupseg.engine import run_stage
from unsupseg.features.clustering import spherical_kmeans
from unsupseg.methods.cause import trainer
from unsupseg.methods.cause.losses import draw_grid_order, modularity_loss, sample_grid


def describe(samples: torch.Tensor, tokens: torch.Tensor, codebook: torch.Tensor, temperature: float) -> str:
    """Concepts in use among the sampled tokens (B x n x D ``samples``; ``tokens``: the same flattened to
    unit rows), and Step 1's objective on them (per image)."""
    counts = torch.bincount((tokens @ F.normalize(codebook, dim=1).T).argmax(1), minlength=len(codebook))
    objective = float(modularity_loss(samples, codebook, temperature))
    return f"{int((counts > 0).sum())} of {len(codebook)} concepts in use, Step 1 objective {objective:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--concepts", type=int, default=512)
    parser.add_argument("--step1-epochs", type=int, default=0,
                        help="epochs of Step 1's modularity loss after the k-means init (0: k-means as it is)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()

    try:
        run, params, source, dist = load_cause_run(args.run, {"concepts": args.concepts})
    except ValueError as err:
        parser.error(str(err.args[0]))
    config = run.config
    torch.manual_seed(config.seed)   # as fit does
    tic = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 1000 + 11)
    samples = []
    for chunk in torch.arange(len(source)).split(params.batch_size):
        order = draw_grid_order(len(chunk), source.grid, generator, params.grid_window)
        features = trainer.to_tokens(source.load(chunk, slice(None))[0])
        samples.append(sample_grid(features, order, source.grid, params.grid_window))
    samples = torch.cat(samples)
    tokens = F.normalize(samples.flatten(0, 1), dim=1)
    codebook = spherical_kmeans(tokens, args.concepts, generator, restarts=1, iterations=50)
    temperature = params.modularity_temperature
    print(f"k-means clusterbook: {describe(samples, tokens, codebook, temperature)}", flush=True)
    with tempfile.TemporaryDirectory() as checkpoints:
        if args.step1_epochs:
            step1 = dataclasses.replace(params, mediator_epochs=args.step1_epochs)
            stage, mediator = trainer.mediator_stage(source, step1, dist, config.seed, "cpu")
            mediator.codebook.data.copy_(codebook)
            run_stage(stage, Path(checkpoints), dist, lambda msg: None)
            codebook = mediator.codebook.detach()
            after = describe(samples, tokens, codebook, temperature)
            print(f"after {args.step1_epochs} Step 1 epochs: {after}", flush=True)
        seg = rerun_steps_2_3(run, params, source, dist, codebook, Path(checkpoints))
    seconds = time.perf_counter() - tic
    for crf in (False, True):
        result = api.evaluate(seg, dataset=args.dataset, root=args.root, split=args.split, matching=["dataset"],
                              crf=crf)
        classes = ", ".join(f"{name} {iou:.0f}" for name, iou in result["per_class_iou"].items())
        print(f"{args.run.name} (seed {config.seed}), k-means clusterbook K = {args.concepts}, "
              f"{args.step1_epochs} Step 1 epochs, {'CRF' if crf else 'no CRF'}: "
              f"{result['pixel_accuracy']:.1f} / {result['miou']:.1f} (steps 1-3: {seconds:.0f} s)\n"
              f"  IoU: {classes}", flush=True)


if __name__ == "__main__":
    main()
