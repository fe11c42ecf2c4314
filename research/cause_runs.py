"""Shared by the CAUSE run diagnostics (cause_step3_draws.py, cause_tr_attention.py): a finished run's
config, params and training features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from unsupseg import api, rundir
from unsupseg.backbones import build_backbone
from unsupseg.engine import run_stage
from unsupseg.engine.distributed import init_distributed
from unsupseg.features.source import open_features
from unsupseg.methods.cause import trainer
from unsupseg.methods.cause.params import Params


def load_cause_run(path: Path, changes: dict | None = None):
    """(run, params with ``changes``, the training features as a StoreSource, the Dist) of a CAUSE run;
    the features come from the cache (built if missing); ValueError if the run is not a CAUSE one."""
    run = rundir.load(path)
    config = run.config
    if config.method not in trainer.VARIANTS:
        raise ValueError(f"{path} is a {config.method} run, not a CAUSE one")
    params = dataclasses.replace(api.resolve_method(config)[1], **(changes or {}))
    dist = init_distributed("cpu", "fp32")
    net = build_backbone(config.backbone.name, config.backbone.weights, device="cpu")
    store, _ = open_features(
        net, api.build_train_dataset(config), api._train_preprocess(config, net.stride, params.train_resolution),
        cache=config.data.cache, cache_dir=config.cache_dir, max_gb=config.data.cache_max_gb,
        batch_size=config.batch_size, flip=False, strict=config.data.strict, workers=0, dist=dist,
        log=lambda msg: None, warn=print, description="training features",
    )
    return run, params, trainer.StoreSource(store, labelled=False, scale=params.feature_scale), dist


def params_changes(items: list[str]) -> dict:
    """--set PARAM=VALUE items as a dict (values read as YAML, as config files are); KeyError names an
    unknown parameter."""
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Params)}:
            raise KeyError(f"--set {item}: CAUSE has no parameter {key!r}")
        changes[key] = yaml.safe_load(value)
    return changes


def rerun_steps_2_3(run, params, source, dist, codebook, checkpoints: Path):
    """Steps 2-3 of ``run`` exactly as ``fit`` runs them (its seed and generators), on ``codebook``;
    returns the run's Segmenter carrying the new teacher head and centroids, detached from the run
    directory (evaluating it records nothing in the run's meta.json)."""
    config = run.config
    stage, front = trainer.front_door_stage(source, codebook, trainer.VARIANTS[config.method], None, params, dist,
                                            config.seed, "cpu")
    run_stage(stage, checkpoints, dist, lambda msg: None)
    stage, cluster = trainer.cluster_stage(
        source, front.head_teacher, front.student.linear, config.clusters, params, dist, config.seed, "cpu"
    )
    run_stage(stage, checkpoints, dist, lambda msg: None)
    seg = api.load(run.path)
    seg.path = None
    seg.predictor.head = front.head_teacher.eval()
    seg.predictor.centroids.copy_(cluster.centroids.detach())
    return seg
