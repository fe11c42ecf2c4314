"""STEGO on two gloo CPU processes (torchrun's setup): both end with identical weights.

Kept apart from the API tests so the spawned workers import only torch and the STEGO module.
"""

import os

import torch
import torch.multiprocessing as mp

from tests.torchrun import AGENT_STORE, rendezvous_port
from unsupseg.config import RunConfig, to_dict
from unsupseg.engine import Dist, process_group, run_stage
from unsupseg.features.cache import open_or_build
from unsupseg.features.knn import knn_indices, pooled_descriptors
from unsupseg.methods import stego
from unsupseg.methods.base import FitContext


def _store(folder, n=8, dim=12, side=5):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(dim, side, side, generator=gen) for _ in range(n)]
    labels = [torch.randint(-1, 3, (side * 8, side * 8), generator=gen) for _ in range(n)]

    def items():
        for i in range(n):
            yield f"im{i}", maps[i], labels[i]

    return open_or_build(folder, {"test": "stego-ddp", "n": n}, items)


def _training(store, dist):
    params = stego.Params(dim=4, batch_size=4, steps=3, knn_k=2, feature_samples=3, neg_samples=2)
    config = RunConfig(method="stego", clusters=3, params=to_dict(params))
    ctx = FitContext(config, params, None, lambda **_: store, None, 3, dist, None, lambda _: None)
    torch.manual_seed(0)
    return stego.build_training(ctx, store, knn_indices(pooled_descriptors(store), len(store)))


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **AGENT_STORE)
    torch.set_num_threads(1)
    with process_group("gloo", rank=rank, world_size=world):
        store = _store(folder)
        stage, model = _training(store, Dist(rank=rank, world_size=world))
        seen = []
        inner = stage.step
        stage.step = lambda i, batch: (seen.append(batch.clone()), inner(i, batch))[1]
        run_stage(stage, None, Dist(rank=rank, world_size=world))
        torch.save({"state": model.state_dict(), "batches": seen}, os.path.join(out, f"rank{rank}.pt"))


def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    _store(tmp_path / "cache")         # built once here, read by both workers
    with rendezvous_port() as port:
        mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # both processes drew the same global batches (each trains on its half, see Dist.shard) ...
    assert all(torch.equal(a, b) for a, b in zip(r0["batches"], r1["batches"]))
    # ... and the weights did train
    _, initial = _training(_store(tmp_path / "cache"), Dist())
    assert not torch.equal(initial.state_dict()["head.cluster1.0.weight"], r0["state"]["head.cluster1.0.weight"])


def test_torchrun_fit_on_a_cold_cache_shards_extraction_and_agrees(tmp_path):
    from tests.conftest import write_images
    from tests.torchrun import fit_two_ranks

    write_images(tmp_path / "photos", 8)
    (a, b), logs = fit_two_ranks(
        tmp_path,
        "stego",
        clusters=3,
        backbone="efficientnet_lite0",
        backbone_weights="random",
        overrides=[
            "params.steps=3",
            "params.batch_size=4",
            "params.knn_k=2",
            "params.dim=8",
            "data.resolution=64",
            "data.workers=0",
        ],
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "rank 0/2 extracted its share, items 0-3 (4 of 8)" in logs[0]
    assert "rank 1/2 extracted its share, items 4-7 (4 of 8)" in logs[1]
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not list(entries[0].glob(".*"))
