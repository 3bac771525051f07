"""`anomap predict`: files, folders and globs in batches; bad files skipped and listed; CSV/JSON; onnx = torch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomap
from anomap.cli import main
from anomap.runtime.backend import load_backend
from anomap.runtime.batch import COLUMNS, collect_inputs, predict_stream
from conftest import tiny_ssl_ae_with_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny ssl_ae model, its ONNX export, and a folder with 6 good images, a corrupt and an empty file."""
    root = tmp_path_factory.mktemp("predict")
    data, model, _ = tiny_ssl_ae_with_onnx(root)
    folder = root / "in"
    (folder / "sub").mkdir(parents=True)
    for p in sorted((data / "test").rglob("*.png"))[:5]:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    Image.fromarray(np.full((40, 60), 128, np.uint8)).save(folder / "sub" / "grey.png")  # other size and mode
    good = (data / "test/good/000.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    return {"model": model, "onnx": root / "m.onnx", "in": folder, "data": data}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_folder_with_corrupt_and_empty_files(setup, tmp_path, capsys):
    out, ov = tmp_path / "r.csv", tmp_path / "ov"
    code = main(["predict", str(setup["model"]), str(setup["in"]), "--out", str(out), "--overlays", str(ov),
                 "--batch-size", "4", "-q"])
    err = capsys.readouterr().err
    assert code == 1  # some files were skipped
    assert f"skipped {setup['in'] / 'corrupt.png'}" in err and "truncated" in err
    assert f"skipped {setup['in'] / 'empty.png'}" in err and "scored 6 image(s)" in err and "skipped 2" in err
    with out.open(newline="") as f:
        assert next(csv.reader(f)) == list(COLUMNS) == ["path", "score", "is_anomalous", "threshold", "status",
                                                        "error"]
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert len(rows) == 8
    for name in ("corrupt.png", "empty.png"):
        assert rows[name]["status"] == "error" and rows[name]["score"] == "" and rows[name]["error"]
    thr = anomap.load(setup["model"]).calibration.threshold
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["error"] == "" for r in ok)
    for r in ok:
        assert float(r["threshold"]) == thr and r["is_anomalous"] == str(float(r["score"]) > thr)
    assert len(list(ov.glob("*_overlay.png"))) == 6 and (ov / "sub__grey_overlay.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_output_glob_and_threshold_override(setup, tmp_path, capsys):
    out = tmp_path / "r.json"
    pattern = str(setup["in"] / "**" / "*.png")
    assert main(["predict", str(setup["model"]), pattern, "--out", str(out), "--threshold", "0", "-q"]) == 1
    doc = json.loads(out.read_text())
    assert doc["threshold"] == 0.0 and doc["summary"] == {"scored": 6, "skipped": 2, "anomalous": 6, "threshold": 0.0}
    assert len(doc["results"]) == 8 and all(set(r) == set(COLUMNS) for r in doc["results"])
    bad = [r for r in doc["results"] if r["status"] == "error"]
    assert {Path(r["path"]).name for r in bad} == {"corrupt.png", "empty.png"}
    assert all(r["score"] is None and r["is_anomalous"] is None for r in bad)


def test_all_good_exits_0_and_prints_rows(setup, capsys):
    files = sorted(setup["in"].glob("*_0*.png"))
    assert main(["predict", "--model", str(setup["model"]), *map(str, files), "-q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(files) and all(line.split("\t")[2] == str(f) for line, f in zip(lines, files, strict=True))


def test_onnx_backend_gives_the_same_verdicts(setup, tmp_path):
    a, b = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(setup["model"]), str(setup["in"]), "--out", str(a), "-q"]) == 1
    assert main(["predict", str(setup["onnx"]), str(setup["in"]), "--out", str(b), "-q", "--batch-size", "3"]) == 1
    ra, rb = read_csv(a), read_csv(b)
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    assert [r["status"] for r in ra] == [r["status"] for r in rb]
    thr = float(ra[0]["threshold"])
    tol = 1e-3 * abs(thr)  # torch and onnxruntime add in different orders: scores agree to about this
    for x, y in zip(ra, rb, strict=True):
        if x["status"] == "ok":
            sx, sy = float(x["score"]), float(y["score"])
            assert abs(sx - sy) <= tol
            for r, s in ((x, sx), (y, sy)):  # each backend's verdict is its own score against the threshold
                assert r["is_anomalous"] == str(s > float(r["threshold"]))
            if abs(sx - thr) > tol:  # only a score within the backends' difference of it may flip
                assert x["is_anomalous"] == y["is_anomalous"]


def test_batch_size_does_not_change_results(setup):
    backend = load_backend(setup["model"])
    paths, names = collect_inputs([setup["in"]])
    one = list(predict_stream(backend, paths, batch_size=1, names=names))
    many = list(predict_stream(backend, paths, batch_size=16, names=names))
    assert [r["status"] for r in one] == [r["status"] for r in many]
    assert sum(r["score"] is None for r in one) == sum(r["score"] is None for r in many) == 2
    for r1, r2 in zip(one, many, strict=True):
        if r1["score"] is not None:
            assert r1["score"] == pytest.approx(r2["score"], rel=1e-5)


def test_input_errors_stop_before_anything_runs(setup, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["predict", str(setup["model"]), str(tmp_path / "none*.png"), "--out", str(out)]) == 2
    assert "no image files match" in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(setup["model"])]) == 2
    assert "give a model file and at least one image" in capsys.readouterr().err
    assert main(["predict", str(setup["model"]), str(setup["in"]), "--backend", "onnx"]) == 2
    assert "anomap export" in capsys.readouterr().err
