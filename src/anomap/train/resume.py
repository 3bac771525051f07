"""Resume checks: may :func:`anomap.train.loop.train` continue from this training checkpoint?

A checkpoint is resumable only by the same method, config (up to :data:`RUNTIME_KEYS`), training
plan and number of images; anything else raises CheckpointError with the fix. The config compared is
the one stored in the checkpoint (``meta["config"]``), as it was written: a key the checkpoint lacks
counts as changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anomap.errors import CheckpointError

# Config keys that only control how a run executes; changing them does not invalidate a checkpoint.
RUNTIME_KEYS = frozenset({"max_train_seconds", "device", "num_threads", "checkpoint_every"})


def check_compatible(meta: dict[str, Any], extra_meta: dict[str, Any], planned: dict[str, int], n: int,
                     path: Path) -> None:
    """Refuse to resume from a checkpoint of another method, config, plan or image set."""
    fix = "delete the checkpoint or drop --resume to train from scratch"
    if meta.get("kind") != "train_state":
        raise CheckpointError("not a resumable training checkpoint.", path=path, fix=fix)
    if "method" in extra_meta and meta.get("method") != extra_meta["method"]:
        raise CheckpointError(
            f"written by method {meta.get('method')!r}, not {extra_meta['method']!r}.", path=path, fix=fix
        )
    if "config" in extra_meta:
        old = {k: v for k, v in (meta.get("config") or {}).items() if k not in RUNTIME_KEYS}
        current = json.loads(json.dumps(extra_meta["config"], default=str))  # as it would be stored
        new = {k: v for k, v in current.items() if k not in RUNTIME_KEYS}
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            was = " ".join(f"{k}={_arg(old[k])}" for k in diff if k in old)
            raise CheckpointError(f"written with a different config ({', '.join(diff)}).", path=path,
                                  fix=f"resume with its settings (--set {was}), or {fix}" if was else fix)
    if meta.get("planned") != planned or meta.get("n_images") != n:
        raise CheckpointError(
            "written for a different training plan or number of images.", path=path, fix=fix
        )


def _arg(value: object) -> str:
    """A config value as it would be typed after ``--set key=``."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
