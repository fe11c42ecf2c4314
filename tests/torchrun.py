"""Two processes launched as torchrun launches them (its environment variables, gloo on loopback),
each running the real ``api.fit`` on a cold feature cache: the multi-process path from a cold start."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unsupseg.engine import leave_process_group


@contextlib.contextmanager
def rendezvous_port() -> Iterator[int]:
    """The port of a rendezvous store that this process hosts for its children, as torchrun's agent does
    (children set ``AGENT_STORE``): the port stays bound from its choice to the end, so no other program
    can take it in between (binding a free port, closing it and handing its number on was a race)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield store.port
    finally:
        del store


# every rank a client of the parent's store (rank 0 would otherwise try to bind the port itself)
AGENT_STORE = {"TORCHELASTIC_USE_AGENT_STORE": "True"}


def _fit_rank(rank: int, world: int, port: int, folder: str, method: str, fit_kwargs: dict) -> None:
    from unsupseg import api

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), UNSUPSEG_PROGRESS="0",
                      UNSUPSEG_CACHE_DIR=f"{folder}/cache", **AGENT_STORE)
    torch.set_num_threads(1)
    logs = []
    try:
        seg = api.fit(method, out=Path(folder) / "run", images=Path(folder) / "photos", log=logs.append, **fit_kwargs)
    except BaseException:
        leave_process_group(wait=False)
        raise
    torch.save(seg.predictor.state_dict(), Path(folder) / f"rank{rank}.pt")
    (Path(folder) / f"log{rank}.txt").write_text("\n".join(logs))
    leave_process_group()   # as the CLI does after a command


def fit_two_ranks(folder: Path, method: str, **fit_kwargs) -> tuple[list[dict], list[str]]:
    """Fit ``method`` on ``folder/photos`` in two torchrun-like processes (cache in ``folder/cache``, run
    in ``folder/run``); returns each rank's predictor state and log."""
    with rendezvous_port() as port:
        mp.spawn(_fit_rank, args=(2, port, str(folder), method, fit_kwargs), nprocs=2, join=True)
    states = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return states, [(folder / f"log{r}.txt").read_text() for r in (0, 1)]
