"""torch.distributed wiring: one process per device, launched by ``torchrun``.

Outside torchrun (no WORLD_SIZE in the environment) everything degrades to a single process.
CPU runs use the gloo backend, CUDA runs nccl. A Dist also carries the resolved precision of its
device (``engine.precision``): ``run_stage`` runs every training step inside ``dist.autocast()``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from .precision import autocast, resolve_precision


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"        # resolved: bf16 (autocast) or fp32

    def autocast(self):
        """The mixed-precision context of this process's device (a no-op for fp32)."""
        return autocast(self.device, self.precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap a trainable module so that backward all-reduces its gradients."""
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a per-step batch of ``n`` items (n divisible by world)."""
        if n % self.world_size:
            raise ConfigError(f"batch size {n} is not divisible by the number of processes {self.world_size}")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of every rank (their lengths may differ)."""
        if not self.enabled:
            return tensor
        length = torch.tensor([tensor.shape[0]], device=tensor.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        longest = int(max(x.item() for x in lengths))
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(n.item())] for g, n in zip(gathered, lengths)])

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(tensor, src=0)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str = "auto", precision: str = "fp32") -> Dist:
    """Join the process group when launched by torchrun; otherwise a single-process Dist.

    ``precision`` (auto | bf16 | fp32) is resolved for the device; the default keeps float32."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        base = resolve_device(device)
        return Dist(device=base, precision=resolve_precision(precision, base))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device)
    if base.type == "cuda":
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        join_process_group("nccl" if base.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=base,
                precision=resolve_precision(precision, base))


def join_process_group(backend: str, **kwargs) -> None:
    """``dist.init_process_group(backend, **kwargs)``, with torch._dynamo imported first.

    DDP imports torch._dynamo on first use, and that import keeps ten references to the process
    group that exists at the time (counted with ``sys.getrefcount``; torch 2.14), so
    ``destroy_process_group`` cannot free it: gloo's worker and socket threads then outlive the
    interpreter, and now and then abort the process at exit ("terminate called without an active
    exception") after its work is done. Imported before the group exists, it holds none."""
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, **kwargs)


def leave_process_group(wait: bool = True) -> None:
    """Destroy the process group, if any, so that its threads end before the interpreter does;
    ``wait``: first meet the other processes (a barrier), so none tears down while another still
    communicates. A process that failed leaves without waiting for the others."""
    if not dist.is_initialized():
        return
    if wait:
        try:
            dist.barrier()
        except RuntimeError:  # another process failed and left: its own error is the one to report
            pass
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str, **kwargs) -> Iterator[None]:
    """Join the process group for the ``with`` block and leave it at the end (waiting for the
    others unless the block raised): for a script of one's own that starts its processes itself."""
    join_process_group(backend, **kwargs)
    try:
        yield
    except BaseException:
        leave_process_group(wait=False)
        raise
    leave_process_group()
