"""CAUSE under DDP: two CPU processes on gloo train one model (gradients all-reduced, bank gathered)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from unsupseg.engine import Dist, process_group
from unsupseg.features.cache import open_or_build
from unsupseg.methods.cause.params import Params
from unsupseg.methods.cause.trainer import StoreSource, run_cause


def make_store(path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 16, 8, 8, generator=g)
    labels = torch.randint(-1, 3, (8, 16, 16), generator=g)
    return open_or_build(path / "cache", {"ddp": 1}, lambda: ((str(i), feats[i], labels[i]) for i in range(8)))


def params(**kw):
    return Params(concepts=8, reduced_dim=6, projection_dim=8, bank_size=4, batch_size=4, ref_world_size=1,
                  tr_ffn_dim=16, head_epochs=2, cluster_epochs=1, checkpoint_every=1,
                  pos_threshold=0.0, neg_threshold=-0.2, **kw)


def worker(rank: int, world: int, folder: str) -> None:
    os.environ["UNSUPSEG_PROGRESS"] = "0"
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world):
        from pathlib import Path

        import unsupseg.methods.cause.trainer as trainer

        store = make_store(Path(folder) / f"rank{rank}")
        captured = {}
        real = trainer.front_door_stage

        def keep_bank(*args, **kwargs):  # a spy: the bank is not part of the run state
            stage, front = real(*args, **kwargs)
            captured["bank"] = front.bank
            return stage, front

        trainer.front_door_stage = keep_bank
        for variant in ("mlp", "tr"):
            torch.manual_seed(0)
            state = run_cause(variant, StoreSource(store, False), StoreSource(store, True), 3, 3, params(),
                              Dist(rank, world), 0, "cpu", Path(folder) / variant, lambda msg: None)
            state["bank.values"] = captured["bank"].values
            state["bank.length"] = captured["bank"].length
            torch.save(state, Path(folder) / f"{variant}{rank}.pt")


def test_two_gloo_processes_end_with_identical_weights_and_bank(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for variant in ("mlp", "tr"):
        a = torch.load(tmp_path / f"{variant}0.pt", weights_only=True)
        b = torch.load(tmp_path / f"{variant}1.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{variant}: {key}"
        assert int(a["bank.length"].sum()) > 0
        # rank 0 alone wrote the checkpoints
        assert sorted(p.name for p in (tmp_path / variant).iterdir()) == [
            "cause-step1-clusterbook.pt", "cause-step2-front-door.pt", "cause-step3-cluster.pt"]


def test_torchrun_fit_on_a_cold_cache_shards_extraction_and_agrees(tmp_path):
    # issue 12: under torchrun a cold cache crashed in _io.atomic_path (both ranks wrote one entry)
    from tests.conftest import write_images
    from tests.torchrun import fit_two_ranks

    write_images(tmp_path / "photos", 8)
    (a, b), logs = fit_two_ranks(
        tmp_path,
        "cause-mlp",
        preset="demo",
        clusters=3,
        backbone_weights="random",
        overrides=[
            "params.mediator_epochs=2",
            "params.head_epochs=2",
            "params.cluster_epochs=2",
            "params.batch_size=4",
            "params.concepts=8",
            "data.resolution=64",
            "data.workers=0",
        ],
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "rank 0/2 extracted its share, items 0-3 (4 of 8)" in logs[0]
    assert "rank 1/2 extracted its share, items 4-7 (4 of 8)" in logs[1]
    assert "extracted its share" not in logs[0].replace("rank 0/2 extracted its share", "")
    # one complete entry, no part or temporary file left
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == ["features.f16", "index.json"]
