"""Shared training engine: devices, torchrun DDP, checkpoints, resume, progress."""

from .distributed import Dist, init_distributed, resolve_device
from .loop import GeneratorState, Stage, run_stage

__all__ = ["Dist", "GeneratorState", "Stage", "init_distributed", "resolve_device", "run_stage"]
