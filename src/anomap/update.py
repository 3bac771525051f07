"""``anomap update``: fold operator feedback (:mod:`anomap.feedback`) into a saved model, no retraining.

The ``normal`` records (confirmed false alarms) are what changes the model:

* a method with a memory (gtrans with ``memory=fused|only``) adds them to it through
  :meth:`anomap.Detector.add_normals`, which then recalibrates on the held-out normals only (the added
  images are in-sample now; see docs/methods.md, "Adding normal images"). Images folded in by an
  earlier update (``info["feedback_sha256"]``) are not added twice;
* a method without one (ssl_ae, isstad, gtrans ``memory=off``) is recalibrated on its held-out normals
  plus the feedback normals: both are normal images the model never trained on.

The ``anomalous`` records (confirmed defects) change nothing; they check that the update did not stop
flagging them. When one image has both verdicts the latest counts. The report says what changed on the
held-out normals, the feedback normals and the confirmed defects (docs/deploy.md).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomap.detector import Detector
from anomap.errors import AnomapError, ConfigError, DataError, ImageError
from anomap.feedback import FeedbackRecord, FeedbackStore, file_sha256, model_hash
from anomap.fileio import atomic_write_bytes
from anomap.train.runtime import set_threads

MAX_LINEAGE = 16  # earlier models whose hashes an updated model keeps (their feedback is not "another model's")
_FIX_RECORD = "delete the record's files (<id>.json and its image) from the feedback folder and run again"


class UpdateWarning(UserWarning):
    """Something the operator should know about an update (the CLI prints it on one line)."""


def update_model(model: str | Path, feedback: str | Path | Sequence[str | Path], out: str | Path, *,
                 data: str | Path | None = None, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Load ``model``, fold the records of the ``feedback`` folder(s) into it, save it as ``out``.

    Args:
        model: a ``.safetensors`` model (an ``.onnx`` export is refused: update its source, export again).
        feedback: one feedback folder or several.
        out: where the updated model goes (atomically; may be ``model`` itself).
        data: the training folder, for the held-out normals (default: the one recorded in the model).
        device: torch device (default: the model's).
        progress: show progress bars.

    Returns:
        The report (see :func:`format_report`), JSON-able.
    """
    t0 = time.perf_counter()
    model = Path(model)
    if model.suffix.lower() == ".onnx":
        raise ConfigError("is an ONNX export; anomap update changes the .safetensors model it came from.",
                          path=model, fix="update the .safetensors model, then run `anomap export` again")
    records = read_feedback([feedback] if isinstance(feedback, (str, Path)) else list(feedback))
    normals, anomalous, conflicts = latest_verdicts(records)
    if not normals:
        raise DataError(f"the feedback holds no `normal` records ({len(anomalous)} anomalous), so there is "
                        "nothing to fold into the model.", path=_first(feedback),
                        fix="mark false alarms as normal (POST /v1/feedback with verdict=normal) first")
    det = Detector.load(model, device=device)
    set_threads(det.config.num_threads)  # as `fit` did, so that the held-out scores reproduce the calibration's
    this = [model_hash(model), file_sha256(model)]  # the service may name a model either way
    known = {*this, *det.info.get("previous_models", [])}  # feedback on the models this one was updated from
    other = sum(1 for r in records if r.model_sha256 is not None and r.model_sha256 not in known)
    report = fold_feedback(det, normals, anomalous, data=data, progress=progress)
    det.info = {**det.info, "previous_models": [*det.info.get("previous_models", []), *this][-2 * MAX_LINEAGE:]}
    report["records"] = {"total": len(records), "normal": len(normals), "anomalous": len(anomalous),
                         "both_verdicts": conflicts, "other_model": other}
    _warn_records(report["records"])
    det.save(out)
    report.update(model=str(model), out=str(out), seconds=round(time.perf_counter() - t0, 2))
    return report


def _first(feedback: str | Path | Sequence[str | Path]) -> Path:
    return Path(feedback if isinstance(feedback, (str, Path)) else feedback[0])


def read_feedback(folders: Sequence[str | Path]) -> list[FeedbackRecord]:
    """Every record of the folders (oldest first); a missing or empty folder is a one-line DataError."""
    records: list[FeedbackRecord] = []
    for folder in folders:
        found = FeedbackStore(folder, create=False).records()
        if not found:
            raise DataError("holds no feedback records.", path=folder,
                            fix="give the folder the service stores feedback in (anomap serve --feedback-dir)")
        records += found
    return sorted(records, key=lambda r: (r.time, r.id))


def latest_verdicts(records: Sequence[FeedbackRecord]) -> tuple[list[FeedbackRecord], list[FeedbackRecord], int]:
    """(normal records, anomalous records, images that have both verdicts): one record per image, the
    latest (``records`` oldest first)."""
    latest: dict[str, FeedbackRecord] = {}
    verdicts: dict[str, set[str]] = {}
    for rec in records:
        latest[rec.sha256] = rec
        verdicts.setdefault(rec.sha256, set()).add(rec.verdict)
    kept = sorted(latest.values(), key=lambda r: (r.time, r.id))
    conflicts = sum(1 for v in verdicts.values() if len(v) > 1)
    return ([r for r in kept if r.verdict == "normal"], [r for r in kept if r.verdict == "anomalous"], conflicts)


def has_memory(det: Detector) -> bool:
    """Whether the method learns new normal images into a memory (gtrans with ``memory=fused|only``)."""
    return str(getattr(det.config, "memory", "off")) != "off"


def load_records(det: Detector, records: Sequence[FeedbackRecord], progress: bool = False,
                 desc: str = "feedback images") -> np.ndarray:
    """The records' images at the model's working shape, uint8 (N, h, w, C); each is checked against the
    sha256 in its record. DataError naming the file for an image that changed or cannot be read."""
    from tqdm import tqdm

    c = int(det.channels or 3)
    out = np.empty((len(records), *det.config.work_hw, c), np.uint8)
    bar = tqdm(records, desc=desc, unit="img", leave=False, disable=not progress or len(records) < 5)
    for i, rec in enumerate(bar):
        try:
            if file_sha256(rec.image_path) != rec.sha256:
                raise DataError("this feedback image changed after it was stored (its sha256 differs from the "
                                "record's).", path=rec.image_path, fix=_FIX_RECORD)
            out[i] = det.prepare(rec.image_path)[0]
        except ImageError as e:
            raise DataError(f"this feedback image cannot be read ({e.problem.rstrip('.')}).", path=rec.image_path,
                            fix=_FIX_RECORD) from None
        except OSError as e:
            raise DataError(f"this feedback image cannot be read ({e.strerror or e}).", path=rec.image_path,
                            fix=_FIX_RECORD) from None
    return out


def heldout_images(det: Detector, data: str | Path | None, progress: bool = False) -> np.ndarray | None:
    """The model's held-out normals at the working shape, or None when they are not where the model was
    trained and ``data`` was not given (an explicit ``data`` that does not hold them is an error)."""
    from anomap.data.transforms import load_stack

    try:
        paths = det.heldout_paths(data if data is not None else det.info.get("dataset") or "")
    except AnomapError:
        if data is not None:
            raise
        return None
    return load_stack(paths, det.config.work_hw, int(det.channels or 3), progress=progress,
                      desc="held-out normals")


def fold_feedback(det: Detector, normals: Sequence[FeedbackRecord], anomalous: Sequence[FeedbackRecord], *,
                  data: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Fold the ``normals`` into ``det`` (in place) and measure before and after: the report without its
    ``records``, ``model``, ``out`` and ``seconds`` entries (see :func:`update_model`)."""
    good = load_records(det, normals, progress)
    bad = load_records(det, anomalous, progress, desc="confirmed defects")
    held = heldout_images(det, data, progress)
    memory = has_memory(det)
    if held is None and not memory:
        raise ConfigError("the model's held-out normal images were not found, and a model without a memory is "
                          "updated by recalibrating on them plus the feedback normals.", path=data,
                          fix="pass --data with the folder the model was trained on")
    before = _measure(det, held, good, bad)
    folded = set(det.info.get("feedback_sha256", []))
    if memory:
        new = [i for i, r in enumerate(normals) if r.sha256 not in folded]
        if new:
            det.add_normals(good[new], data=data)
        how = {"mode": "memory", "added": len(new), "already_folded": len(normals) - len(new),
               "recalibrated": bool(new) and held is not None}
    else:
        assert held is not None
        det.calibrate(np.concatenate([held, good]))
        how = {"mode": "recalibration", "added": len(normals), "already_folded": 0, "recalibrated": True}
    shas = sorted(folded | {r.sha256 for r in normals}) if memory else sorted({r.sha256 for r in normals})
    det.info = {**det.info, "feedback_sha256": shas, "feedback_normals": len(shas)}
    after = _measure(det, held, good, bad)
    report = _report(det, before, after, how, normals=normals, anomalous=anomalous)
    _warn_lost(report)
    return report


def _measure(det: Detector, held: np.ndarray | None, good: np.ndarray, bad: np.ndarray) -> dict[str, Any]:
    cal = det.calibration
    return {"threshold": cal.threshold, "n_heldout": cal.n_heldout, "target_fpr": cal.target_fpr,
            "promised_fpr": cal.promised_fpr, "fpr_upper95": cal.fpr_upper95,
            "heldout": None if held is None else _scores(det, held), "normal": _scores(det, good),
            "anomalous": _scores(det, bad)}


def _scores(det: Detector, images: np.ndarray) -> list[float]:
    return [float(s) for s in det.predict_raw(images)[0]] if len(images) else []


def _above(scores: list[float] | None, threshold: float | None) -> int | None:
    if scores is None or threshold is None:
        return None
    return sum(1 for s in scores if s > threshold)


def _report(det: Detector, before: dict[str, Any], after: dict[str, Any], how: dict[str, Any], *,
            normals: Sequence[FeedbackRecord], anomalous: Sequence[FeedbackRecord]) -> dict[str, Any]:
    def counts(key: str) -> dict[str, Any]:
        scores = after[key]
        return {"n": None if scores is None else len(scores), "above_before": _above(before[key], before["threshold"]),
                "above_after": _above(scores, after["threshold"])}

    t0, t1 = before["threshold"], after["threshold"]
    rows = [{"id": r.id, "label": r.label, "verdict": r.verdict, "score_before": b, "score_after": a,
             "flagged_before": bool(_above([b], t0)), "flagged_after": bool(_above([a], t1))}
            for recs, key in ((normals, "normal"), (anomalous, "anomalous"))
            for r, b, a in zip(recs, before[key], after[key], strict=True)]
    calib = {k: {"before": before[k], "after": after[k]}
             for k in ("threshold", "n_heldout", "target_fpr", "promised_fpr", "fpr_upper95")}
    return {"method": det.method_name, **how, "calibration": calib,
            "heldout": counts("heldout"), "feedback_normals": counts("normal"), "anomalous": counts("anomalous"),
            "lost_defects": [row["id"] for row in rows if row["verdict"] == "anomalous"
                             and row["flagged_before"] and not row["flagged_after"]],
            "rows": rows}


def _warn_records(rec: dict[str, Any]) -> None:
    if rec["other_model"]:
        warnings.warn(f"{rec['other_model']} of {rec['total']} feedback record(s) were scored by another model "
                      "(not this model or one it was updated from; an ONNX export counts as another); they are "
                      "used all the same", UpdateWarning, stacklevel=3)
    if rec["both_verdicts"]:
        warnings.warn(f"{rec['both_verdicts']} image(s) have both verdicts; the latest one counts", UpdateWarning,
                      stacklevel=3)


def _warn_lost(report: dict[str, Any]) -> None:
    if report["lost_defects"]:
        warnings.warn(f"{len(report['lost_defects'])} confirmed defect(s) are no longer flagged after the update "
                      f"(e.g. {report['lost_defects'][0]}); check them before serving the new model", UpdateWarning,
                      stacklevel=3)


def _frac(part: int | None, n: int | None) -> str:
    if part is None or n is None:
        return "n/a"
    return f"{part} / {n}" + (f" ({100 * part / n:.1f}%)" if n else "")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines and a Markdown table (what ``anomap update`` prints)."""
    cal, held, fb, bad = report["calibration"], report["heldout"], report["feedback_normals"], report["anomalous"]
    n_before, n_after = cal["n_heldout"]["before"], cal["n_heldout"]["after"]
    if report["mode"] == "memory" and not report["added"]:
        how = f"nothing new: the {report['already_folded']} feedback normal(s) were in the memory already"
    elif report["mode"] == "memory":
        how = (f"{report['added']} feedback normal(s) added to the memory ({report['already_folded']} were already); "
               + (f"recalibrated on {n_after} held-out normals" if report["recalibrated"] else
                  "held-out normals not found: calibration kept (pass --data to recalibrate)"))
    else:
        how = f"recalibrated on {n_before} held-out + {report['added']} feedback normals ({n_after} in all)"
    promise = cal["promised_fpr"]["after"]
    target = (f"target {100 * cal['target_fpr']['after']:.3g}%"
              + ("" if promise is None else f", promised <= {100 * promise:.3g}%"))
    lines = [f"{report['method']}: {how}", "",
             "| | before | after |", "|---|---|---|",
             f"| threshold | {_num(cal['threshold']['before'])} | {_num(cal['threshold']['after'])} |",
             f"| held-out normals above threshold ({target}) | {_frac(held['above_before'], held['n'])} "
             f"| {_frac(held['above_after'], held['n'])} |",
             f"| feedback normals above threshold | {_frac(fb['above_before'], fb['n'])} "
             f"| {_frac(fb['above_after'], fb['n'])} |",
             f"| confirmed defects flagged | {_frac(bad['above_before'], bad['n'])} "
             f"| {_frac(bad['above_after'], bad['n'])} |"]
    rec = report.get("records")
    if rec:
        lines += ["", f"records: {rec['normal']} normal, {rec['anomalous']} anomalous (of {rec['total']}); "
                  f"{rec['other_model']} scored by another model; {rec['both_verdicts']} image(s) with both verdicts"]
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    """The report as JSON, written atomically."""
    import json

    return atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
