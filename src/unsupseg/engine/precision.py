"""Mixed precision, decided in one place for training (``run_stage``) and inference (the Segmenter).

``precision`` (the run config key) is ``auto``, ``bf16`` or ``fp32``:

- ``auto``: bf16 autocast on a CUDA device that computes in bf16 (Ampere and later), float32
  everywhere else, so CPU runs compute exactly as before;
- ``bf16``: bf16 autocast on any device (on CPU it is slow; useful to check a code path);
- ``fp32``: no autocast.

Autocast only changes the dtype of the operations run inside it: parameters, their gradients and
the optimizer states stay float32 (the master weights). bf16 has float32's exponent range, so no
loss scaling is needed. Numerically fragile operations (softmax, log, norms, losses) run in float32
under autocast by PyTorch's own op lists.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(setting: str, device: torch.device | str, cuda_bf16: bool | None = None) -> str:
    """``bf16`` or ``fp32`` for ``setting`` on ``device``; ``cuda_bf16`` says whether the CUDA device
    computes in bf16 (None: ask it)."""
    if setting not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    if torch.device(device).type != "cuda":
        return "fp32"
    if cuda_bf16 is None:
        # emulated bf16 (pre-Ampere GPUs) is slower than float32: auto keeps float32 there
        cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if cuda_bf16 else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision, None for no autocast."""
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"resolved precision must be bf16 or fp32, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context that computes in ``precision`` (resolved) on ``device``."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
