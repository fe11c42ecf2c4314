"""A process that leaves its process group holds no gloo thread afterwards.

gloo's threads that outlive the interpreter abort the process at exit now and then (SIGABRT,
"terminate called without an active exception"), after its work is done: under torchrun a
successful fit then reads as a failure. They outlived it when torch._dynamo, which DDP imports on
first use, was first imported after the group existed (it keeps references to the group, so
destroying the group did not free it), and when the CLI never destroyed its group."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.conftest import write_images
from tests.torchrun import AGENT_STORE, rendezvous_port
from unsupseg.engine import Dist, process_group


def _threads() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _gloo(names: list[str]) -> list[str]:
    return [n for n in names if "gloo" in n]


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world):
        model = Dist(rank, world).wrap(torch.nn.Linear(3, 2))   # DDP's first use imports torch._dynamo
        model(torch.randn(4, 3)).sum().backward()
        during = _threads()
        del model
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"during": during, "after": _threads()}))


def test_a_ddp_step_then_leaving_the_group_ends_every_gloo_thread(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert _gloo(seen["during"]), seen["during"]   # the threads this is about did exist
        assert _gloo(seen["after"]) == [], seen["after"]


def _cli_worker(rank: int, world: int, port: int, folder: str) -> None:
    from unsupseg import cli

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), UNSUPSEG_PROGRESS="0",
                      UNSUPSEG_CACHE_DIR=f"{folder}/cache", **AGENT_STORE)
    torch.set_num_threads(1)
    sys.argv = ["unsupseg", "fit", "--method", "stego", "--images", f"{folder}/photos", "--out", f"{folder}/run",
                "--clusters", "3", "--backbone-weights", "random", "--set", "params.steps=2",
                "--set", "params.batch_size=4", "--set", "params.knn_k=2", "--set", "params.dim=8",
                "--set", "data.resolution=64", "--set", "data.workers=0"]
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code
    Path(folder, f"cli{rank}.json").write_text(json.dumps({"code": code, "after": _threads()}))


def test_a_cli_fit_under_torchrun_leaves_its_process_group(tmp_path):
    write_images(tmp_path / "photos", 8)
    with rendezvous_port() as port:
        mp.spawn(_cli_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"cli{rank}.json").read_text())
        assert seen["code"] == 0
        assert _gloo(seen["after"]) == [], seen["after"]
    assert (tmp_path / "run" / "weights.safetensors").is_file()
