"""How much does CAUSE's Step 3 (the cluster probe) move a run's score? Re-runs Step 3 on a finished
run's teacher head with other seeds (and optionally another init), then scores each on a labelled split.

    python benchmarks/cause_step3_draws.py RUN --seeds 0,1,2 --dataset camvid --root ../shared/data/camvid
    python benchmarks/cause_step3_draws.py RUN --seeds 0,1,2 --set cluster_init=kmeans++ ...

Steps 1-2 are not re-run: the teacher head and the clusterbook come from the run's weights, the
training features from the feature cache (built if missing). Prints one line per seed: pixel
accuracy / mIoU (dataset-wide Hungarian) and per-image mIoU. The run directory is not modified.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import yaml

from unsupseg import api, rundir
from unsupseg.backbones import build_backbone
from unsupseg.engine import run_stage
from unsupseg.engine.distributed import init_distributed
from unsupseg.features.source import open_features
from unsupseg.methods.cause import trainer
from unsupseg.methods.cause.params import Params
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

    run = rundir.load(args.run)
    config = run.config
    if config.method not in trainer.VARIANTS:
        parser.error(f"{args.run} is a {config.method} run, not a CAUSE one")
    params = api._method_params(config)
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Params)}:
            parser.error(f"--set {item}: CAUSE has no parameter {key!r}")
        changes[key] = yaml.safe_load(value)   # as a config file would read it
    params = dataclasses.replace(params, **changes)

    dist = init_distributed("cpu", "fp32")
    net = build_backbone(config.backbone.name, config.backbone.weights, device="cpu")
    store, _ = open_features(
        net, api.build_train_dataset(config), api._train_preprocess(config, net.stride, params.train_resolution),
        cache=config.data.cache, cache_dir=config.cache_dir, max_gb=config.data.cache_max_gb,
        batch_size=config.batch_size, flip=False, strict=config.data.strict, workers=0, dist=dist,
        log=lambda msg: None, warn=print, description="training features",
    )
    source = trainer.StoreSource(store, labelled=False, scale=params.feature_scale)
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
        result = api.evaluate(seg, dataset=args.dataset, root=args.root, split=args.split, matching=["dataset", "per-image"])
        changed = "".join(f" {k}={v}" for k, v in changes.items())
        print(f"{args.run.name} step 3 seed {seed}{changed}: {result['pixel_accuracy']:.1f} / {result['miou']:.1f}, "
              f"per-image mIoU {result['protocols']['per-image']['miou']:.1f} (step 3: {seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
