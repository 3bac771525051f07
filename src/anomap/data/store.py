"""An on-disk cache of decoded, resized uint8 images that is read row by row: training in bounded memory.

:func:`build_store` decodes a list of image files once (a few threads; Pillow releases the GIL while it
decodes and resizes) into one raw file ``images-<key>.u8`` plus a small JSON header in a cache folder.
The key hashes the files' paths, sizes and modification times and the working size, so a second run
(``--resume``) reuses a finished cache and a changed folder gets a new one.

:class:`ImageStore` is the numpy-like view of that file the training loop and the methods use in place
of an (N, H, W, C) uint8 array: ``len``, ``shape``, ``dtype``, ``ndim`` and ``store[key]`` where key is an
int, a slice, an int/bool array or a tuple whose first item is one of those (``pool[j, y0:y1, x0:x1]``).
Every access returns a new, writable ``np.ndarray``; rows are read with ``pread`` into that array.
Unlike ``np.memmap``, whose touched pages are mapped into the process and count in its RSS, read rows
only pass through the kernel's page cache, so the process's peak RSS stays flat however big the file is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from anomap.data.transforms import load_resized
from anomap.errors import DataError
from anomap.fileio import atomic_write_text

FORMAT_VERSION = 1
MAX_READ = 1 << 30  # bytes per read call (Linux caps one read near 2 GiB)


def default_workers() -> int:
    """Decode threads: the usable cores, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class _File:
    """A read-only file descriptor shared by a store and its row views; closed when the last one goes."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = None if hasattr(os, "preadv") else threading.Lock()

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        """Fill the contiguous uint8 array ``buf`` with the file's bytes from ``offset``."""
        view = buf.reshape(-1).data
        done = 0
        while done < len(view):
            part = view[done:done + MAX_READ]
            if self._lock is None:
                got = os.preadv(self.fd, [part], offset + done)
            else:  # no positional reads here (Windows): seek + read under a lock
                with self._lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    data = os.read(self.fd, len(part))
                    got = len(data)
                    part[:got] = data
            if got <= 0:
                raise DataError("the image cache ends early (truncated).", path=self.path,
                                fix="delete the cache folder; it is rebuilt on the next run")
            done += got

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


class ImageStore:
    """Rows ``start:stop`` of a raw uint8 (N, H, W, C) file, indexed like a numpy array (read-only)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, file: _File, n_rows: int, row_shape: tuple[int, int, int], start: int = 0):
        self._file = file
        self._start = start
        self._n = n_rows
        h, w, c = row_shape
        self._row_shape = (int(h), int(w), int(c))
        self._row_bytes = int(np.prod(self._row_shape))

    @classmethod
    def open(cls, data_path: str | Path, n_rows: int, row_shape: tuple[int, int, int]) -> ImageStore:
        """Open a raw file of ``n_rows`` rows of ``row_shape`` uint8 values; its size must match exactly."""
        path = Path(data_path)
        expected = n_rows * int(np.prod(row_shape))
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"the image cache is missing or has the wrong size (expected {expected} bytes).",
                            path=path, fix="delete the cache folder; it is rebuilt on the next run")
        return cls(_File(path), n_rows, row_shape)

    # --- array protocol -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._n, *self._row_shape)

    @property
    def nbytes(self) -> int:
        return self._n * self._row_bytes

    @property
    def path(self) -> Path:
        return self._file.path

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ImageStore({self.path}, shape={self.shape}, start={self._start})"

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._n):
            yield self[i]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """All rows in memory (``np.asarray(store)``): only for sets known to be small."""
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def rows(self, start: int, stop: int) -> ImageStore:
        """A store of rows ``start:stop`` of this one that shares the file (no copy)."""
        start, stop, _ = slice(start, stop).indices(self._n)
        return ImageStore(self._file, max(0, stop - start), self._row_shape, self._start + start)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if not key:
                return self[:]
            first, rest = key[0], key[1:]
            if first is Ellipsis or first is None:
                return self[:][key]
            head = self[first]
            if not rest:
                return head
            if head.ndim == 3:
                return head[rest]
            if any(not isinstance(k, (slice, type(Ellipsis))) for k in rest):
                raise IndexError("an image store takes one row index array, then only slices")
            return head[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -self._n <= i < self._n:
                raise IndexError(f"index {i} is out of bounds for an image store of {self._n} rows")
            out = np.empty(self._row_shape, np.uint8)
            self._file.read_into(out, (self._start + i % self._n) * self._row_bytes)
            return out
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step == 1:
                out = np.empty((max(0, stop - start), *self._row_shape), np.uint8)
                if len(out):
                    self._file.read_into(out, (self._start + start) * self._row_bytes)
                return out
            return self._take(np.arange(start, stop, step))
        return self._take(self._indices(key))

    def _indices(self, key: Any) -> np.ndarray:
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self._n,):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {self._n} rows")
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise IndexError(f"an image store takes ints, slices or 1-D int/bool arrays, not {idx.dtype} {idx.shape}")
        if idx.min() < -self._n or idx.max() >= self._n:
            raise IndexError(f"index out of bounds for an image store of {self._n} rows")
        return idx.astype(np.int64) % self._n

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self._row_shape), np.uint8)
        if len(idx) and np.all(np.diff(idx) == 1):  # a run of rows: one read
            self._file.read_into(out, (self._start + int(idx[0])) * self._row_bytes)
            return out
        for j, i in enumerate(idx):
            self._file.read_into(out[j], (self._start + int(i)) * self._row_bytes)
        return out


def cache_key(paths: Sequence[str | Path], size: tuple[int, int], channels: int) -> str:
    """Hash of the files (resolved path, size, mtime) and the decoded shape: names one cache file."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, list(size), channels]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _write_rows(fd: int, row: np.ndarray, offset: int) -> None:
    data = np.ascontiguousarray(row).reshape(-1).data
    done = 0
    while done < len(data):
        if hasattr(os, "pwrite"):
            done += os.pwrite(fd, data[done:], offset + done)
        else:
            os.lseek(fd, offset + done, os.SEEK_SET)
            done += os.write(fd, data[done:])


def build_store(
    paths: Sequence[str | Path],
    size: tuple[int, int],
    channels: int,
    cache_dir: str | Path,
    *,
    workers: int = 0,
    progress: bool = False,
    desc: str = "caching images",
) -> ImageStore:
    """Decode ``paths`` (resized to ``size`` = (height, width), ``channels`` 1 or 3) into a cache file.

    A finished cache with the same key is reused as it is. Rows are byte-identical to
    ``load_stack(paths, size, channels)``.

    Args:
        paths: image files, in row order.
        size: (height, width) of every row.
        channels: 1 or 3.
        cache_dir: folder for ``images-<key>.u8`` and ``images-<key>.json`` (created).
        workers: decode threads; 0 = :func:`default_workers`.
        progress: show a tqdm bar while decoding.
        desc: the bar's label.

    Raises:
        ImageError: an image cannot be decoded (the message names it; no cache is left behind).
    """
    paths = list(paths)
    h, w = int(size[0]), int(size[1])
    row_shape = (h, w, int(channels))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, (h, w), channels)
    data_path, header_path = cache_dir / f"images-{key}.u8", cache_dir / f"images-{key}.json"
    header = {"format_version": FORMAT_VERSION, "key": key, "n": len(paths), "row_shape": list(row_shape)}
    if header_path.is_file() and data_path.is_file():
        try:
            if json.loads(header_path.read_text()) == header:
                return ImageStore.open(data_path, len(paths), row_shape)
        except (OSError, ValueError, DataError):
            pass  # unreadable or stale: rebuild below

    row_bytes = int(np.prod(row_shape))
    tmp = cache_dir / f".{data_path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        os.ftruncate(fd, len(paths) * row_bytes)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True)
        n_workers = workers if workers > 0 else default_workers()
        try:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="anomap-decode") as pool:
                pending: deque = deque()  # at most 4 decoded rows per worker wait in memory
                for i, p in enumerate(paths):
                    pending.append((i, pool.submit(load_resized, p, (h, w), channels)))
                    while len(pending) > 4 * n_workers or (i == len(paths) - 1 and pending):
                        j, fut = pending.popleft()
                        try:
                            _write_rows(fd, fut.result(), j * row_bytes)
                        except BaseException:
                            for _, f in pending:
                                f.cancel()
                            raise
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        os.close(fd)
        fd = -1
        os.replace(tmp, data_path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    atomic_write_text(header_path, json.dumps(header) + "\n")  # written last: marks the cache complete
    return ImageStore.open(data_path, len(paths), row_shape)
