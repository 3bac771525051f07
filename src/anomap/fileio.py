"""Atomic file writes: a temp file in the same folder, then os.replace (nothing half-written is left)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_state_dict(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A ``state_dict`` of tensors from a user's ``.pth``/``.pt`` (``weights_only``: no code runs) or
    ``.safetensors`` file; a top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is removed.

    Args:
        path: the file.
        what: what the file should hold, for messages ("MAE checkpoint", "teacher weights").
        fix: the advice printed with every error.

    Raises:
        CheckpointError: the file is missing, unreadable or does not hold tensors.
    """
    import torch

    from anomap.errors import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} file not found.", path=p, fix=fix)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise CheckpointError(f"cannot read the {what} ({type(e).__name__}: {e}).", path=p, fix=fix) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the {what} file does not hold a state_dict of tensors.", path=p, fix=fix)
    return state
