"""Where a run executes: the torch device (``device=auto|cpu|cuda[:N]|mps``) and torch's CPU threads."""

from __future__ import annotations

import os

import torch

from anomap.errors import ConfigError


def set_threads(n: int = 0) -> int:
    """Set torch's intra-op threads; ``n == 0`` means all usable cores (at most 16). Returns n."""
    if n <= 0:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        n = max(1, min(n, 16))
    torch.set_num_threads(n)
    return n


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; a device that is not available -> ConfigError."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name.",
                          fix="use device=cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name!r} but this torch has no usable CUDA.",
                fix="use device=cpu or install a CUDA build of torch",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist.",
                fix="use device=cuda:0 or device=auto",
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} is not available here.", fix="use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r} is not supported.", fix="use device=cpu, cuda, cuda:N or auto")
    return dev
