"""Batch prediction behind ``anomap predict``: collect inputs, stream them through a backend in batches,
write CSV/JSON rows and heat-map overlays, and skip (and list) unreadable files instead of stopping.

Decoding the next batch runs in a background thread while the model scores the current one.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from anomap.data.images import is_image_file, load_image, save_png_atomic
from anomap.errors import AnomapError, DataError
from anomap.runtime.backend import Backend

COLUMNS = ("path", "score", "is_anomalous", "threshold", "status", "error")
GLOB_CHARS = frozenset("*?[")


def collect_inputs(items: Sequence[str | Path]) -> tuple[list[Path], dict[Path, str]]:
    """Files, folders (searched recursively, hidden files skipped) and glob patterns -> image paths.

    A file named explicitly is kept whatever its suffix (an unreadable one is reported when scored);
    folders and patterns contribute files with an image suffix only.

    Returns:
        (paths in input order without duplicates, overlay base name of each path: the path relative to
        the folder it was found in with '/' -> '__', or the file's stem; names are made unique).

    Raises:
        DataError: an input neither exists nor matches anything, or no image was found at all.
    """
    paths: list[Path] = []
    names: dict[Path, str] = {}
    seen: set[Path] = set()

    def add(p: Path, name: str) -> None:
        if p not in seen:
            seen.add(p)
            paths.append(p)
            names[p] = name

    for item in items:
        p = Path(item)
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)):
                add(f, "__".join(f.relative_to(p).with_suffix("").parts))
        elif p.exists():
            add(p, p.stem)
        elif GLOB_CHARS & set(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            files = [m for m in matches if m.is_file() and is_image_file(m)]
            if not files:
                raise DataError("no image files match this pattern.", path=item,
                                fix="check the pattern (quote it so the shell does not expand it)")
            for f in files:
                add(f, f.stem)
        else:
            raise DataError("input not found.", path=p, fix="give an image file or a folder of images")
    if not paths:
        raise DataError("no PNG/JPEG/BMP/TIFF images found in the input(s).", path=", ".join(map(str, items)),
                        fix="give image files or folders that contain images")
    used: dict[str, int] = {}
    for p in paths:  # two inputs "a/x.png" and "b/x.png" must not overwrite each other's overlay
        base = names[p]
        used[base] = used.get(base, 0) + 1
        if used[base] > 1:
            names[p] = f"{base}_{used[base]}"
    return paths, names


class RowWriter:
    """Rows to a .csv or .json file, streamed to a temp file and moved into place by :meth:`close`."""

    def __init__(self, path: str | Path, threshold: float | None, meta: dict[str, Any]):
        self.path = Path(path)
        self.json = self.path.suffix.lower() == ".json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.f: TextIO = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self.n = 0
        if self.json:
            head = {"threshold": threshold, **meta}
            self.f.write(json.dumps(head, indent=2)[:-2] + ',\n  "results": [')
        else:
            self.csv = csv.DictWriter(self.f, fieldnames=list(COLUMNS))
            self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.json:
            self.f.write(("," if self.n else "") + "\n    " + json.dumps(row))
        else:
            self.csv.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        self.n += 1

    def close(self, summary: dict[str, Any]) -> Path:
        if self.json:
            self.f.write("\n  ],\n" + json.dumps({"summary": summary}, indent=2)[2:] + "\n")
        self.f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _decode(backend: Backend, paths: Sequence[Path]) -> list[np.ndarray | AnomapError | OSError]:
    out: list[np.ndarray | AnomapError | OSError] = []
    for p in paths:
        try:
            out.append(load_image(p, channels=backend.channels))
        except (AnomapError, OSError, ValueError) as e:  # an unreadable file never stops the run
            out.append(e if isinstance(e, (AnomapError, OSError)) else OSError(str(e)))
    return out


def _message(err: Exception, path: Path) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    prefix = f"{path}: "
    return text.removeprefix(prefix)


def predict_stream(backend: Backend, paths: Sequence[Path], *, batch_size: int = 16,
                   threshold: float | None = None, overlays: str | Path | None = None,
                   names: dict[Path, str] | None = None) -> Iterator[dict[str, Any]]:
    """Score ``paths`` batch by batch; yield one row per path (in order), errors included.

    Rows: path, score (raw, None for a skipped file), is_anomalous (score > threshold; None without a
    threshold or score), threshold, status ("ok" or "error"), error (the reason, "" when ok).

    Args:
        backend: a loaded :class:`~anomap.runtime.backend.Backend`.
        paths: image files.
        batch_size: images per model call (and per decode step).
        threshold: overrides the calibrated threshold.
        overlays: folder for ``<name>_overlay.png`` files (image | heat map), if given.
        names: overlay base names (from :func:`collect_inputs`).
    """
    from anomap.report.overlay import heatmap_overlay, side_by_side

    thr = backend.calibration.threshold if threshold is None else float(threshold)
    cal = backend.calibration
    bs = max(1, int(batch_size))
    chunks = [list(paths[i:i + bs]) for i in range(0, len(paths), bs)]
    if overlays is not None:
        Path(overlays).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode, backend, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            decoded = pending.result() if pending is not None else []
            pending = pool.submit(_decode, backend, chunks[k + 1]) if k + 1 < len(chunks) else None
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            images = [d for d in decoded if isinstance(d, np.ndarray)]
            res = backend.score(images, threshold=thr, maps=overlays is not None, batch_size=bs)
            at = {i: j for j, i in enumerate(good)}  # position in the chunk -> position in res
            for i, p in enumerate(chunk):
                d = decoded[i]
                if not isinstance(d, np.ndarray):
                    yield {"path": str(p), "score": None, "is_anomalous": None, "threshold": thr,
                           "status": "error", "error": _message(d, p)}
                    continue
                j = at[i]
                if overlays is not None:
                    ov = heatmap_overlay(d, res.maps[j], cal.map_low or 0.0, cal.map_scale or 1.0)
                    name = (names or {}).get(p, p.stem)
                    save_png_atomic(Path(overlays) / f"{name}_overlay.png", side_by_side([d, ov]))
                yield {"path": str(p), "score": float(res.scores[j]), "is_anomalous": res.is_anomalous[j],
                       "threshold": thr, "status": "ok", "error": ""}
