"""End-to-end CLI error handling: every bad input ends with exit code 2 and one helpful stderr line.

Each case checks: exit code 2, exactly one line on stderr starting with "anomap: error:", the
offending file/folder named in it, a "Fix:" hint where one exists, and no traceback anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import anomap
from anomap.cli import main
from anomap.config import config_to_dict
from anomap.train.checkpoint import save_checkpoint
from conftest import TINY, make_category

SETS = ["--set", "image_size=32", "--set", "max_steps=3", "--set", "width=8", "--set", "batch_size=4",
        "--set", "min_heldout=3", "--set", "device=cpu", "--set", "num_threads=1"]


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit 2 and a single traceback-free error line; return that line."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 2, (code, cap.out, cap.err)
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("anomap: error:"), lines[0]
    return lines[0]


def fit_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--method", "ssl_ae", "--data", str(data), "--out", str(out), "-q", *SETS, *extra]


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` that a failed run may have left: model files, checkpoints, temp files."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny category and a valid model trained on it (a few steps at 32 px)."""
    root = tmp_path_factory.mktemp("errs")
    data = make_category(root / "cat")
    cfg = {**TINY, "max_steps": 3}
    model = anomap.create("ssl_ae", **cfg).fit(data, progress=False).save(root / "model.safetensors")
    return data, model


def write_truncated_png(path: Path, size: int = 48) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ---------------------------------------------------------------------------------------------- fit

def test_fit_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_category"
    out_dir = tmp_path / "out"
    line = one_line_error(fit_argv(missing, out_dir / "m.safetensors"), capsys)
    assert str(missing) in line and "folder not found" in line and "Fix:" in line
    assert leftovers(out_dir) == []


def test_fit_empty_train_good(tmp_path, capsys):
    data = make_category(tmp_path / "cat", n_train=0)
    out_dir = tmp_path / "out"
    line = one_line_error(fit_argv(data, out_dir / "m.safetensors"), capsys)
    assert str(data / "train" / "good") in line and "no training images" in line and "Fix:" in line
    assert leftovers(out_dir) == []


def test_fit_truncated_train_image_names_the_file(tmp_path, capsys):
    data = make_category(tmp_path / "cat")
    bad = data / "train/good/005.png"
    write_truncated_png(bad)
    out_dir = tmp_path / "out"
    line = one_line_error(fit_argv(data, out_dir / "m.safetensors"), capsys)
    assert str(bad) in line and "truncated" in line and "Fix:" in line
    assert leftovers(out_dir) == []


def test_fit_text_file_named_png(tmp_path, capsys):
    data = make_category(tmp_path / "cat")
    bad = data / "train/good/notes.png"
    bad.write_text("this is not an image\n")
    out_dir = tmp_path / "out"
    line = one_line_error(fit_argv(data, out_dir / "m.safetensors"), capsys)
    assert str(bad) in line and "not a readable image" in line and "Fix:" in line
    assert leftovers(out_dir) == []


def test_fit_image_too_small_names_the_file(tmp_path, capsys):
    data = make_category(tmp_path / "cat")
    bad = data / "train/good/tiny.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(bad)
    out_dir = tmp_path / "out"
    argv = fit_argv(data, out_dir / "m.safetensors", "--set", "image_size=128")
    line = one_line_error(argv, capsys)
    assert str(bad) in line and "8x8" in line and "Fix:" in line and "image_size" in line
    assert leftovers(out_dir) == []


def test_fit_failing_after_training_leaves_no_model_or_temp_files(tmp_path, capsys, monkeypatch):
    """A failure after the weights were trained keeps only the resumable .partial, nothing else."""
    data = make_category(tmp_path / "cat")
    out_dir = tmp_path / "out"
    out = out_dir / "m.safetensors"

    def boom(self, heldout, *args, **kwargs):
        raise anomap.errors.AnomapError("calibration failed (injected).", fix="none needed")

    monkeypatch.setattr(anomap.detector.Detector, "calibrate", boom)
    line = one_line_error(fit_argv(data, out), capsys)
    assert "calibration failed (injected)." in line
    assert not out.exists()
    assert [n for n in leftovers(out_dir) if n != "m.safetensors.partial"] == []


def test_fit_resume_from_partial_of_other_config(tmp_path, capsys, monkeypatch):
    """A real .partial (training interrupted after its steps), resumed with a changed width."""
    data = make_category(tmp_path / "cat")
    out = tmp_path / "out" / "m.safetensors"
    partial = Path(str(out) + ".partial")

    def interrupt(self, heldout, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(anomap.detector.Detector, "calibrate", interrupt)
        assert main(fit_argv(data, out, "--set", "checkpoint_every=1")) == 130
    capsys.readouterr()
    assert partial.is_file() and not out.exists()

    line = one_line_error(fit_argv(data, out, "--resume", "--set", "width=16"), capsys)
    assert str(partial) in line and "different config (width)" in line
    assert "Fix:" in line and "delete the checkpoint" in line and "drop --resume" in line
    assert not out.exists()


def test_fit_resume_from_synthetic_train_state_of_other_config(tmp_path, capsys):
    data = make_category(tmp_path / "cat")
    out = tmp_path / "out" / "m.safetensors"
    partial = Path(str(out) + ".partial")
    cfg = config_to_dict(anomap.create("ssl_ae", **{**TINY, "max_steps": 3}).config)
    cfg["lr"] = 0.01  # everything else matches the SETS used below
    save_checkpoint(partial, {"x": torch.zeros(1)},
                    {"kind": "train_state", "method": "ssl_ae", "config": cfg})
    line = one_line_error(fit_argv(data, out, "--resume"), capsys)
    assert str(partial) in line and "different config (lr)" in line
    assert "resume with its settings (--set lr=0.01)" in line  # how to continue it instead
    assert "delete the checkpoint" in line and "drop --resume" in line
    assert not out.exists()


def test_fit_resume_from_garbage_partial(tmp_path, capsys):
    data = make_category(tmp_path / "cat")
    out = tmp_path / "out" / "m.safetensors"
    partial = Path(str(out) + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(300))
    line = one_line_error(fit_argv(data, out, "--resume"), capsys)
    assert str(partial) in line and "not a readable anomap checkpoint" in line and "Fix:" in line
    assert not out.exists()


# ----------------------------------------------------------------------------------------- evaluate

def test_evaluate_defect_image_without_mask(tmp_path, capsys, trained):
    _, model = trained
    data = make_category(tmp_path / "cat")
    mask = data / "ground_truth/spot/002_mask.png"
    mask.unlink()
    line = one_line_error(["evaluate", "--model", model, "--data", data, "-q"], capsys)
    assert str(data / "test/spot/002.png") in line and str(mask) in line
    assert "has no mask" in line and "Fix:" in line


def test_evaluate_mask_of_other_size(tmp_path, capsys, trained):
    _, model = trained
    data = make_category(tmp_path / "cat")
    mask = data / "ground_truth/spot/001_mask.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(mask)
    line = one_line_error(["evaluate", "--model", model, "--data", data, "-q"], capsys)
    assert str(mask) in line and str(data / "test/spot/001.png") in line
    assert "30x20" in line and "48x48" in line and "Fix:" in line


def test_evaluate_without_test_folder(tmp_path, capsys, trained):
    _, model = trained
    data = tmp_path / "cat"
    (data / "train/good").mkdir(parents=True)
    line = one_line_error(["evaluate", "--model", model, "--data", data, "-q"], capsys)
    assert str(data) in line and "no test folder" in line and "Fix:" in line


# ------------------------------------------------------------------------------------ bad model files

def _truncated(tmp: Path, model: Path) -> Path:
    raw = model.read_bytes()
    p = tmp / "truncated.safetensors"
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _garbage(tmp: Path, model: Path) -> Path:
    p = tmp / "garbage.safetensors"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _foreign(tmp: Path, model: Path) -> Path:
    p = tmp / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(p), metadata={"producer": "someone else"})
    return p


@pytest.mark.parametrize("cmd", ["evaluate", "predict"])
@pytest.mark.parametrize("make,needle", [
    (_truncated, "not a readable anomap checkpoint"),
    (_garbage, "not a readable anomap checkpoint"),
    (_foreign, "not an anomap checkpoint"),
])
def test_bad_model_file(cmd, make, needle, tmp_path, capsys, trained):
    data, model = trained
    bad = make(tmp_path, model)
    if cmd == "evaluate":
        argv = ["evaluate", "--model", bad, "--data", data, "-q"]
    else:
        argv = ["predict", "--model", bad, data / "test/good", "-q"]
    line = one_line_error(argv, capsys)
    assert str(bad) in line and needle in line and "Fix:" in line


def test_predict_with_training_checkpoint_instead_of_model(tmp_path, capsys, trained):
    data, _ = trained
    partial = tmp_path / "m.safetensors.partial"
    save_checkpoint(partial, {"x": torch.zeros(1)}, {"kind": "train_state", "method": "ssl_ae"})
    line = one_line_error(["predict", "--model", partial, data / "test/good", "-q"], capsys)
    assert str(partial) in line and "training checkpoint" in line and "--resume" in line and "Fix:" in line


# ------------------------------------------------------------------------------------------ predict

def test_predict_missing_input(tmp_path, capsys, trained):
    _, model = trained
    missing = tmp_path / "nowhere" / "img.png"
    out_csv = tmp_path / "pred.csv"
    line = one_line_error(["predict", "--model", model, missing, "--out", out_csv, "-q"], capsys)
    assert str(missing) in line and "input not found" in line and "Fix:" in line
    assert not out_csv.exists()


def test_predict_empty_folder(tmp_path, capsys, trained):
    _, model = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(["predict", "--model", model, empty, "-q"], capsys)
    assert str(empty) in line and "no PNG/JPEG/BMP/TIFF images" in line and "Fix:" in line


def test_predict_truncated_image_names_the_file(tmp_path, capsys, trained):
    """An unreadable image is skipped, reported on one stderr line and the run exits 1 (not 2)."""
    _, model = trained
    bad = tmp_path / "broken.png"
    write_truncated_png(bad)
    assert main(["predict", "--model", str(model), str(bad), "-q"]) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    (line,) = [ln for ln in cap.err.splitlines() if ln.startswith("anomap: skipped")]
    assert str(bad) in line and "truncated" in line and "Fix:" in line
    assert "SKIPPED" in cap.out and "skipped 1" in cap.err
