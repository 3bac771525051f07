"""Operator feedback on disk: an image and its verdict, ``normal`` (a false alarm) or ``anomalous``.

:class:`FeedbackStore` keeps one folder, flat:

* ``<id>.<ext>``: the image bytes exactly as received (``<ext>`` from the upload's name when it is an
  image extension anomap reads, else ``.bin``; anomap's decoder reads the bytes, not the extension);
* ``<id>.json``: the record (verdict, time, model hash, label, score, the image's sha256, size and file
  name). Written last: it is the commit point. A record exists when its JSON exists;
* ``.lock``: taken (``flock``) by every writer, so several threads and processes can share the folder.

``<id>`` is the first 32 hex digits of the image's sha256, a dash and the verdict, so the same image with
the same verdict is one record however often it is sent (a client that retries after a crash or a
timeout makes no duplicate). Each file is written to a hidden temp file, fsync'ed and renamed into place,
and the folder is fsync'ed after the image and again after the JSON: when :meth:`FeedbackStore.add`
returns, the record survives a kill -9 or a power cut. A crash before that leaves at most a hidden temp
file or an image without JSON, which :meth:`FeedbackStore.records` never shows and the next
:class:`FeedbackStore` on the folder removes. The store is bounded (records and bytes); a full store
refuses new records with :class:`FeedbackFull` and keeps everything it holds.

No web framework is imported here: ``anomap update`` reads the store without the serve extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anomap.errors import AnomapError, ConfigError, DataError
from anomap.fileio import atomic_write_bytes

try:  # POSIX: writers in several processes exclude each other; elsewhere threads only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

VERDICTS = ("normal", "anomalous")
FORMAT = "anomap-feedback/1"
ID_HEX = 32  # hex digits of the image's sha256 in a record id (128 bits)
# Extensions kept from an upload's name (what anomap's decoder reads); anything else is stored as .bin.
KEEP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
LABEL_MAX = 255  # characters of an upload's name kept as its label
JSON_RESERVE = 1024  # bytes a record's JSON is counted as before it is written
_LOCK = ".lock"


@dataclass(frozen=True)
class FeedbackRecord:
    """One stored verdict on one image (see the module docstring for the files behind it)."""

    id: str  # unique record id (file-name safe)
    verdict: str  # "normal" | "anomalous"
    time: float  # unix seconds when stored
    model_sha256: str | None  # hash of the model that scored the image (model_hash)
    label: str  # the upload's file name, a label only (never used as a path)
    score: float | None  # the score the serving model gave, if known
    sha256: str  # of the image bytes
    image_path: Path  # where the image bytes are stored

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_path": str(self.image_path)}


class FeedbackFull(AnomapError):
    """The feedback folder holds as many records or bytes as it may; nothing more is stored."""


def check_verdict(verdict: str) -> str:
    """``verdict`` if it is one of :data:`VERDICTS`, else a one-line ConfigError naming them."""
    if verdict not in VERDICTS:
        raise ConfigError(f"verdict {str(verdict)[:40]!r} is not one of {', '.join(VERDICTS)}.",
                          fix="send verdict=normal for a false alarm, verdict=anomalous for a defect")
    return verdict


def record_id(sha256: str, verdict: str) -> str:
    return f"{sha256[:ID_HEX]}-{verdict}"


def _extension(label: str) -> str:
    suffix = os.path.splitext(label)[1].lower()
    return suffix if suffix in KEEP_EXTENSIONS else ".bin"


def _finite(score: float | None) -> float | None:
    if score is None:
        return None
    value = float(score)
    return value if math.isfinite(value) else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeedbackStore:
    """A bounded folder of feedback records, safe against crashes and concurrent writers.

    Args:
        root: the folder (created unless ``create`` is False).
        max_items: most records it holds.
        max_bytes: most bytes its records (images and JSON) take.
        create: False: a missing folder is a DataError (readers such as ``anomap update``).
    """

    def __init__(self, root: str | Path, max_items: int = 10_000, max_bytes: int = 1 << 30, *,
                 create: bool = True):
        if int(max_items) < 1 or int(max_bytes) < 1:
            raise ConfigError(f"feedback limits must be positive (max_items={max_items}, max_bytes={max_bytes}).",
                              fix="give at least 1 record and 1 byte")
        self.root = Path(root)
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise DataError("feedback folder not found." if not self.root.exists() else "is not a folder.",
                            path=self.root, fix="give the folder the service stores feedback in "
                            "(anomap serve --feedback-dir DIR)")
        self._thread_lock = threading.Lock()
        self._tidy()

    # ------------------------------------------------------------------------------------- writing
    def add(self, image: bytes, verdict: str, *, label: str = "", model_sha256: str | None = None,
            score: float | None = None) -> FeedbackRecord:
        """Store ``image`` with ``verdict``; durable (files and folder fsync'ed) before it returns.

        The same bytes with the same verdict give back the record already stored (nothing is written).

        Raises:
            ConfigError: ``verdict`` is not ``normal`` or ``anomalous``.
            DataError: ``image`` is empty.
            FeedbackFull: the record would pass ``max_items`` or ``max_bytes``.
        """
        check_verdict(verdict)
        data = bytes(image)
        if not data:
            raise DataError("the feedback image is empty (0 bytes).", fix="send the image's bytes")
        sha = hashlib.sha256(data).hexdigest()
        rid = record_id(sha, verdict)
        with self._locked():
            old = self._read(self.root / f"{rid}.json")
            if old is not None and old.sha256 == sha:
                return old
            self._check_room(len(data))
            rec = FeedbackRecord(id=rid, verdict=verdict, time=time.time(), model_sha256=model_sha256,
                                 label=str(label)[:LABEL_MAX], score=_finite(score), sha256=sha,
                                 image_path=self.root / f"{rid}{_extension(str(label))}")
            atomic_write_bytes(rec.image_path, data)
            _fsync_dir(self.root)  # the image is on disk before the record that names it
            atomic_write_bytes(self.root / f"{rid}.json", self._json(rec, len(data)))
            _fsync_dir(self.root)  # the commit
            return rec

    def _check_room(self, n_bytes: int) -> None:
        sizes = self._committed()
        used = sum(sizes.values())
        if len(sizes) + 1 > self.max_items or used + n_bytes + JSON_RESERVE > self.max_bytes:
            raise FeedbackFull(
                f"the feedback folder is full ({len(sizes)} of {self.max_items} records, "
                f"{used / 1e6:.1f} of {self.max_bytes / 1e6:.1f} MB); nothing was stored", path=self.root,
                fix="fold it into the model with `anomap update MODEL --feedback DIR --out NEW`, then move "
                    "its files elsewhere (or give the store higher limits)")

    @staticmethod
    def _json(rec: FeedbackRecord, n_bytes: int) -> bytes:
        body = {"format": FORMAT, "id": rec.id, "verdict": rec.verdict, "time": rec.time,
                "model_sha256": rec.model_sha256, "label": rec.label, "score": rec.score,
                "sha256": rec.sha256, "bytes": n_bytes, "image": rec.image_path.name}
        return (json.dumps(body, indent=1) + "\n").encode("utf-8")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This store's threads, then (POSIX) every process writing to the folder, one at a time."""
        with self._thread_lock:
            if fcntl is None:
                yield
                return
            fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _tidy(self) -> None:
        """Remove what a crash mid-write left (hidden temp files, images without a record); best effort:
        a reader without write permission leaves them, and :meth:`records` never shows them anyway."""
        try:
            with self._locked():
                names = {e.name for e in os.scandir(self.root) if e.is_file()}
                ids = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
                for name in names:
                    temp = name.startswith(".") and name.endswith(".tmp") and _looks_like_id(_stem(name[1:]))
                    orphan = not name.startswith(".") and not name.endswith(".json") and _stem(name) not in ids
                    if temp or (orphan and _looks_like_id(_stem(name))):
                        with contextlib.suppress(OSError):
                            (self.root / name).unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------------------------- reading
    def records(self, verdict: str | None = None) -> list[FeedbackRecord]:
        """The whole records (oldest first), of one verdict or all; half-written ones never appear."""
        if verdict is not None:
            check_verdict(verdict)
        found = []
        for name in sorted(self._committed()):
            rec = self._read(self.root / f"{name}.json")
            if rec is not None and (verdict is None or rec.verdict == verdict):
                found.append(rec)
        return sorted(found, key=lambda r: (r.time, r.id))

    def _read(self, path: Path) -> FeedbackRecord | None:
        """The record in ``path``, or None when it is missing, damaged, or its image is not whole."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            image = self.root / Path(str(d["image"])).name  # a name in this folder, never a path
            rec = FeedbackRecord(id=str(d["id"]), verdict=str(d["verdict"]), time=float(d["time"]),
                                 model_sha256=None if d["model_sha256"] is None else str(d["model_sha256"]),
                                 label=str(d["label"]), score=_finite(d["score"]), sha256=str(d["sha256"]),
                                 image_path=image)
            whole = d.get("format") == FORMAT and image.stat().st_size == int(d["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ok = whole and rec.verdict in VERDICTS and rec.id == path.stem == record_id(rec.sha256, rec.verdict)
        return rec if ok else None

    def _committed(self) -> dict[str, int]:
        """Record id -> bytes on disk (its JSON and its image) for every committed record."""
        sizes: dict[str, int] = {}
        files: list[tuple[str, int]] = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            files.append((entry.name, entry.stat().st_size))
            if entry.name.endswith(".json"):
                sizes[entry.name[:-5]] = 0
        for name, size in files:
            stem = _stem(name)
            if stem in sizes:
                sizes[stem] += size
        return sizes

    def __len__(self) -> int:
        return len(self._committed())

    def size_bytes(self) -> int:
        """Bytes the committed records take (images and JSON)."""
        return sum(self._committed().values())


def _stem(name: str) -> str:
    return name.split(".", 1)[0]


def _looks_like_id(stem: str) -> bool:
    digest, _, verdict = stem.partition("-")
    return verdict in VERDICTS and len(digest) == ID_HEX and all(c in "0123456789abcdef" for c in digest)


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """A stable hash naming a model file: for a ``.safetensors`` model the content hash anomap stored in
    its header (read without the tensors), for an ``.onnx`` file (or a file without one) the sha256 of
    its bytes.

    Raises:
        CheckpointError: a ``.safetensors`` file that is not a readable anomap model.
        OSError: the file cannot be read.
    """
    p = Path(path)
    if p.suffix.lower() != ".onnx":
        from anomap.train.checkpoint import stored_hash

        stored = stored_hash(p)
        if stored:
            return stored
    return file_sha256(p)
