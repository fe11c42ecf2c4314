"""How much does CAUSE's Step 3 (the cluster probe) move a run's score? Re-runs Step 3 on a finished
run's teacher head with other seeds (and optionally another init), then scores each on a labelled split.

    python research/cause_step3_draws.py RUN --seeds 0,1,2 --dataset camvid --root ../shared/data/camvid
    python research/cause_step3_draws.py RUN --seeds 0,1,2 --set cluster_init=kmeans++ ...

Steps 1-2 are not re-run: the teacher head and the clusterbook come from the run's weights, the
training features from the feature cache (built if missing). Prints one line per seed: pixel
accuracy / mIoU (dataset-wide Hungarian) and per-image mIoU. The run directory is not modified.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cause_runs import load_cause_run, params_changes

from unsupseg import api
from unsupseg.engine import run_stage
from unsupseg.methods.cause import trainer
from unsupseg.methods.cause.predictor import head_from_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                        help="a Step 3 parameter of params: (cluster_init, cluster_init_restarts, cluster_epochs, ...)")
    args = parser.parse_args()

    try:
        changes = params_changes(args.set)
        run, params, source, dist = load_cause_run(args.run, changes)
    except (KeyError, ValueError) as err:
        parser.error(str(err.args[0]))
    config = run.config
    seg = api.load(args.run)
    seg.path = None   # evaluate records metrics in a run's meta.json: these are not the run's
    for seed in (int(s) for s in args.seeds.split(",")):
        head = head_from_state(run.state, params).train()   # Step 3 runs the teacher in train mode
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            stage, cluster = trainer.cluster_stage(source, head, None, config.clusters, params, dist, seed, "cpu")
            run_stage(stage, Path(checkpoints), dist, lambda msg: None)
        seconds = time.perf_counter() - tic
        seg.predictor.centroids.copy_(cluster.centroids.detach())
        result = api.evaluate(
            seg, dataset=args.dataset, root=args.root, split=args.split, matching=["dataset", "per-image"]
        )
        changed = "".join(f" {k}={v}" for k, v in changes.items())
        print(f"{args.run.name} step 3 seed {seed}{changed}: {result['pixel_accuracy']:.1f} / {result['miou']:.1f}, "
              f"per-image mIoU {result['protocols']['per-image']['miou']:.1f} (step 3: {seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
