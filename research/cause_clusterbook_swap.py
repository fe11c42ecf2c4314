"""Does a CAUSE fit's outcome come from its Step 1 clusterbook or from Steps 2-3? Re-runs Steps 2-3 of
a finished run (its config and seed) on the clusterbook of another run, then scores a labelled split.

    python research/cause_clusterbook_swap.py RUN --clusterbook-from OTHER_RUN --dataset camvid --root DATA/camvid
    python research/cause_clusterbook_swap.py RUN --clusterbook-from RUN ...   # control: reproduces RUN's fit

Step 1 is not re-run (its clusterbook is read from OTHER_RUN's weights); Steps 2 and 3 run exactly as in
``fit`` (same seed, generators and thread count give the same head as the fit when the clusterbook is
the run's own). Prints pixel accuracy / mIoU (dataset-wide Hungarian), per-image mIoU and the IoU of
each class. The run directories are not modified. Takes as long as Steps 2-3 of the fit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from cause_runs import load_cause_run, rerun_steps_2_3

from unsupseg import api, rundir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--clusterbook-from", type=Path, required=True, metavar="OTHER_RUN")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()

    try:
        run, params, source, dist = load_cause_run(args.run)
        other = rundir.load(args.clusterbook_from)
    except ValueError as err:
        parser.error(str(err.args[0]))
    if "codebook" not in other.state:
        parser.error(f"{args.clusterbook_from} holds no CAUSE clusterbook ('codebook')")
    codebook = other.state["codebook"]
    if codebook.shape != (params.concepts, source.dim):
        parser.error(f"{args.clusterbook_from}'s clusterbook is {tuple(codebook.shape)}, "
                     f"{args.run} needs ({params.concepts}, {source.dim})")
    config = run.config
    torch.manual_seed(config.seed)   # as fit does; Step 1 draws from its own generators only
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as checkpoints:
        seg = rerun_steps_2_3(run, params, source, dist, codebook, Path(checkpoints))
    seconds = time.perf_counter() - tic
    result = api.evaluate(
        seg, dataset=args.dataset, root=args.root, split=args.split, matching=["dataset", "per-image"]
    )
    classes = ", ".join(f"{name} {iou:.0f}" for name, iou in result["per_class_iou"].items())
    print(f"{args.run.name} (seed {config.seed}) on the clusterbook of {args.clusterbook_from.name}: "
          f"{result['pixel_accuracy']:.1f} / {result['miou']:.1f}, per-image mIoU "
          f"{result['protocols']['per-image']['miou']:.1f} (steps 2-3: {seconds:.0f} s)\n  IoU: {classes}", flush=True)


if __name__ == "__main__":
    main()
