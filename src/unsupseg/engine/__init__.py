"""Shared training engine: devices, torchrun DDP, checkpoints, resume, progress."""

from .distributed import (
    Dist,
    init_distributed,
    join_process_group,
    leave_process_group,
    process_group,
    resolve_device,
)
from .loop import GeneratorState, Stage, run_stage
from .precision import PRECISIONS, autocast, resolve_precision

__all__ = ["PRECISIONS", "Dist", "GeneratorState", "Stage", "autocast", "init_distributed", "join_process_group",
           "leave_process_group", "process_group", "resolve_device", "resolve_precision", "run_stage"]
