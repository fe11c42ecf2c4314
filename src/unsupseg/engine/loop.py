"""The shared training loop: steps, progress, periodic checkpoints and exact resume.

A method describes one training stage as a ``Stage``: how many steps, how to draw the batches of an
epoch (a pure function of the epoch number, so a resumed run sees the same order), the step function,
and the stateful objects to checkpoint (modules, optimizers, schedulers, banks, generators). The loop
saves all of them plus the global torch RNG (dropout) every ``checkpoint_every`` steps, atomically,
and a resumed stage continues from the last checkpoint and ends with the same weights as an
uninterrupted one.

Every step runs inside ``dist.autocast()``: on a GPU the methods' forward passes and losses compute
in bf16 with float32 weights (config ``precision``); on CPU, in float32 as written. Wrapping the
whole step keeps the methods free of precision code; the backward ops then run in the dtype of
their forward ops, as they would anyway, and the optimizers update the float32 weights. The context
is entered anew for each step, so autocast's cache of bf16 weight copies is dropped after every
optimizer step (a step never runs a forward after its optimizer step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .._io import atomic_path, torch_load_plain
from .._progress import make_progress
from ..errors import Interrupted, RunDirError
from .distributed import Dist


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class GeneratorState:
    """Adapts a torch.Generator to the state_dict protocol."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


@dataclass
class Stage:
    name: str
    total_steps: int
    steps_per_epoch: int
    batches: Callable[[int], Iterable]           # epoch -> batches of that epoch, deterministic
    step: Callable[[int, Any], dict[str, float]]  # (global step, batch) -> logged numbers ("loss", "images")
    state: dict[str, Stateful] = field(default_factory=dict)
    checkpoint_every: int = 100


def _checkpoint_path(ckpt_dir: Path, stage: Stage) -> Path:
    return ckpt_dir / f"{stage.name}.pt"


def _save(path: Path, stage: Stage, step: int, done: bool) -> None:
    payload = {
        "step": step,
        "done": done,
        "rng": torch.get_rng_state(),
        "state": {name: obj.state_dict() for name, obj in stage.state.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path, stage: Stage) -> tuple[int, bool]:
    payload = torch_load_plain(path, RunDirError)
    try:
        for name, obj in stage.state.items():
            obj.load_state_dict(payload["state"][name])
        torch.set_rng_state(payload["rng"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise RunDirError(
            f"training checkpoint {path} cannot be resumed ({err}); delete it to restart this stage"
        ) from None
    return int(payload["step"]), bool(payload["done"])


def _train(stage: Stage, path: Path | None, dist: Dist, start: int, history: list[dict]) -> int:
    """The steps from ``start`` to the end, checkpointed; appends each step's logs to ``history``.

    Ctrl-C raises ``Interrupted`` naming the step a rerun resumes from: that of the last checkpoint
    written whole (one that Ctrl-C cut short never replaces the previous one: the write is atomic)."""
    step = saved = start
    try:
        with make_progress() as progress:
            task = progress.add_task(stage.name, total=stage.total_steps, completed=start, info="")
            tic, seen = time.perf_counter(), 0
            while step < stage.total_steps:
                epoch, offset = divmod(step, stage.steps_per_epoch)
                for i, batch in enumerate(stage.batches(epoch)):
                    if i < offset:
                        continue
                    with dist.autocast():
                        logs = stage.step(step, batch)
                    step += 1
                    history.append(logs)
                    seen += int(logs.get("images", 0))
                    rate = seen / max(time.perf_counter() - tic, 1e-9)
                    progress.update(task, advance=1,
                                    info=f"loss {logs.get('loss', float('nan')):.4f}  {rate:.1f} img/s")
                    if path is not None and step % stage.checkpoint_every == 0 and step < stage.total_steps:
                        if dist.is_main:
                            _save(path, stage, step, done=False)
                        saved = step   # other ranks: the step the main process saves
                    if step >= stage.total_steps or step % stage.steps_per_epoch == 0:
                        break
                if step == epoch * stage.steps_per_epoch + offset:
                    raise RuntimeError(f"stage {stage.name}: epoch {epoch} yielded no batch to train on")
                if step % stage.steps_per_epoch and step < stage.total_steps:
                    raise RuntimeError(
                        f"stage {stage.name}: epoch {epoch} yielded fewer than {stage.steps_per_epoch} batches"
                    )
    except KeyboardInterrupt:
        if path is None:
            raise Interrupted("interrupted; this stage keeps no checkpoint, a rerun starts it again") from None
        raise Interrupted(f"interrupted; rerun the same command to resume from step {saved}/{stage.total_steps} "
                          f"of {stage.name}") from None
    return step


def run_stage(stage: Stage, ckpt_dir: str | Path | None, dist: Dist,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or resume, or skip if finished) one stage; returns the per-step logs of this call."""
    path = _checkpoint_path(Path(ckpt_dir), stage) if ckpt_dir is not None else None
    start = 0
    if path is not None and path.exists():
        start, done = _load(path, stage)
        if done:
            return []
        if log and start:
            log(f"{stage.name}: resuming from step {start}/{stage.total_steps}")
    history: list[dict] = []
    step = _train(stage, path, dist, start, history)
    if path is not None and dist.is_main:
        _save(path, stage, step, done=True)
    dist.barrier()
    return history
