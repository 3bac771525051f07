"""Checkpoints as safetensors files: tensors plus a JSON metadata header. Loading never unpickles.

A checkpoint is one ``.safetensors`` file. Its header metadata holds three string entries:

* ``"anomap"``: the caller's metadata dict as JSON;
* ``"format_version"``: the integer :data:`FORMAT_VERSION` as a string;
* ``"sha256"``: :func:`content_hash` of the tensors and the two entries above.

Writes are atomic: a temp file in the target's directory is written, fsync'ed and renamed over the
target, so a crash mid-write leaves the previous checkpoint intact.

Integrity: :func:`load_checkpoint` recomputes the hash and rejects a file whose tensors or metadata
changed after it was written (a flipped bit, an edit, a partial copy) with a :class:`CheckpointError`
naming the file. The hash detects damage and careless edits; it is not a signature (whoever can
write the file can recompute it). Format 2 is the first released one: files of format 1 (written
before the hash existed, by development versions of anomap 0.1.0) are refused, as is a format-2 file
without a hash.

Loading never executes code from the file: only ``safetensors`` (raw tensor bytes) and ``json`` read
it; nothing here imports ``pickle`` or calls ``torch.load``.

Optimiser state (``Optimizer.state_dict()``) is turned into tensors plus a JSON-able structure by
:func:`flatten_optimizer_state` and restored exactly by :func:`unflatten_optimizer_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, uint8

from anomap.errors import CheckpointError
from anomap.fileio import atomic_write_bytes

FORMAT_VERSION = 2  # 2: adds the "sha256" content hash; the first released format, the oldest one read

_META_KEY = "anomap"
_VERSION_KEY = "format_version"
_HASH_KEY = "sha256"
_HASH_DOMAIN = b"anomap-checkpoint-sha256\0"
_FIX_TAMPERED = ("the file was changed or damaged after anomap wrote it: use an intact copy or retrain "
                 "(for a .partial training checkpoint, delete it or drop --resume)")
_FIX_UNHASHED = ("re-train it; or re-save it (anomap.load(path).save(path)) with a development version of "
                 "anomap that writes format 2; for a .partial training checkpoint, delete it or drop --resume")
_NOT_READABLE = "not a readable anomap checkpoint (truncated or not a safetensors file)"
_FIX_REWRITE = ("use an intact model file (re-save or copy it again); for a .partial training checkpoint, "
                "delete it or drop --resume to train from scratch")
# What safetensors (and the OS) raise for a file that is not a complete safetensors file.
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError)


def _json_default(obj: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-able; anything else is a bug in the caller."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint metadata value of type {type(obj).__name__} is not JSON-able")


def _prepare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach, move to CPU, make contiguous; clone tensors whose storage is already used by another."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint entry {name!r} is not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0:
            seen.add(ptr)
        out[name] = t
    return out


def content_hash(tensors: dict[str, Tensor], meta_json: str, version: str) -> str:
    """SHA-256 (hex) over the tensors in name order (name, dtype, shape, raw bytes) and the metadata.

    ``meta_json`` and ``version`` are the header strings exactly as stored. Every part is length-
    prefixed, so no two different checkpoints hash the same byte stream.
    """
    h = hashlib.sha256(_HASH_DOMAIN)

    def part(data: bytes | memoryview) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(version.encode("utf-8"))
    part(meta_json.encode("utf-8"))
    h.update(len(tensors).to_bytes(8, "little"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        part(name.encode("utf-8"))
        part(f"{t.dtype}|{tuple(t.shape)}".encode())
        part(t.reshape(-1).view(uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write ``tensors`` and ``metadata`` atomically to ``path`` (parent folders are created).

    Args:
        path: target file, conventionally ending in ``.safetensors``.
        tensors: named tensors (any device, any layout); stored contiguous on CPU.
        metadata: JSON-able dict (numpy scalars and paths are converted).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_json = json.dumps(metadata, default=_json_default)
    prepared = _prepare(tensors)
    header = {
        _META_KEY: meta_json,
        _VERSION_KEY: str(FORMAT_VERSION),
        _HASH_KEY: content_hash(prepared, meta_json, str(FORMAT_VERSION)),
    }
    data = save(prepared, metadata=header)
    atomic_write_bytes(path, data)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _header(path: Path) -> dict[str, str]:
    """The safetensors header metadata, checked for our keys and version."""
    if not path.is_file():
        raise CheckpointError(
            "checkpoint file not found.", path=path, fix="check the path, or train first to create it"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except _READ_ERRORS:
        raise CheckpointError(_NOT_READABLE, path=path, fix=_FIX_REWRITE) from None
    if _META_KEY not in header:
        raise CheckpointError(
            "a safetensors file, but not an anomap checkpoint.",
            path=path,
            fix="point to a file written by anomap",
        )
    try:
        version = int(header.get(_VERSION_KEY, "0"))
    except ValueError:
        raise CheckpointError(_NOT_READABLE, path=path, fix=_FIX_REWRITE) from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"written by a newer anomap; upgrade (file format {version}, this anomap reads {FORMAT_VERSION}).",
            path=path,
            fix="pip install --upgrade anomap",
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"written by a development version of anomap without a content hash (file format {version}); "
            f"this anomap reads format {FORMAT_VERSION} only.",
            path=path,
            fix=_FIX_UNHASHED,
        )
    return header


def _decode(path: Path, header: dict[str, str]) -> dict:
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(_NOT_READABLE, path=path, fix=_FIX_REWRITE) from None
    if not isinstance(meta, dict):
        raise CheckpointError(_NOT_READABLE, path=path, fix=_FIX_REWRITE)
    return meta


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of a checkpoint, without loading its tensors (so without the hash check:
    use :func:`load_checkpoint` before trusting the values)."""
    path = Path(path)
    return _decode(path, _header(path))


def stored_hash(path: str | Path) -> str | None:
    """The content hash stored in a checkpoint's header (read without its tensors, so not verified)."""
    return _header(Path(path)).get(_HASH_KEY)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        (tensors on CPU, metadata dict).

    Raises:
        CheckpointError: the file is missing, truncated, not safetensors, not an anomap checkpoint,
            of another format version (a newer one, or format 1 without a content hash), or its
            content hash is missing or does not match.
    """
    path = Path(path)
    header = _header(path)
    meta = _decode(path, header)
    try:
        tensors = load_file(str(path), device="cpu")
    except _READ_ERRORS:
        raise CheckpointError(_NOT_READABLE, path=path, fix=_FIX_REWRITE) from None
    _verify(path, header, tensors)
    return tensors, meta


def _verify(path: Path, header: dict[str, str], tensors: dict[str, Tensor]) -> None:
    """Check the stored content hash (every file of the formats :func:`_header` lets through has one)."""
    stored = header.get(_HASH_KEY)
    version = header[_VERSION_KEY]
    if stored is None:
        raise CheckpointError("has no content hash although its format requires one.", path=path, fix=_FIX_TAMPERED)
    if content_hash(tensors, header[_META_KEY], version) != stored:
        raise CheckpointError("content hash mismatch: tensors or metadata differ from what was written.",
                              path=path, fix=_FIX_TAMPERED)


# --- optimiser state --------------------------------------------------------------------------------

_OPT_PREFIX = "optim."


def _encode(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of ``value``; tensors go to ``tensors[key]`` and leave a reference behind."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
        return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer state entry {key!r} of type {type(value).__name__} cannot be stored")


def _decode_value(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode_value(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {k: _decode_value(v, tensors) for k, v in value["__items__"]}
        return {k: _decode_value(v, tensors) for k, v in value.items()}
    return value


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split ``Optimizer.state_dict()`` into tensors and a JSON-able structure.

    Tensor keys look like ``"optim.state.3.exp_avg"``; the structure keeps the param groups and the
    non-tensor state values (python floats/ints, tuples) and references the tensors by key.

    Returns:
        (tensors, structure); pass both to :func:`unflatten_optimizer_state`.
    """
    tensors: dict[str, Tensor] = {}
    state = [
        [pid, {name: _encode(v, f"{_OPT_PREFIX}state.{pid}.{name}", tensors) for name, v in entry.items()}]
        for pid, entry in state_dict.get("state", {}).items()
    ]
    groups = [_encode(g, f"{_OPT_PREFIX}group.{i}", tensors) for i, g in enumerate(state_dict["param_groups"])]
    extra = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    structure = {"state": state, "param_groups": groups, "extra": _encode(extra, f"{_OPT_PREFIX}extra", tensors)}
    return tensors, structure


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Rebuild the ``Optimizer.state_dict()`` flattened by :func:`flatten_optimizer_state`.

    ``tensors`` may hold other entries too (a whole checkpoint); only the referenced keys are used.
    """
    try:
        state = {pid: _decode_value(entry, tensors) for pid, entry in meta["state"]}
        groups = [_decode_value(g, tensors) for g in meta["param_groups"]]
        extra = _decode_value(meta.get("extra", {}), tensors)
    except KeyError as e:
        raise CheckpointError(f"optimizer state refers to a missing tensor {e}.", fix=_FIX_REWRITE) from None
    return {"state": state, "param_groups": groups, **extra}
