"""``anomap update``: confirmed false alarms folded into a tiny gtrans memory model (they score normal after,
the other images keep their order) and into a tiny ssl_ae (recalibrated on held-out + feedback normals, the
threshold as computed by hand); the report, the JSON, and the command's one-line errors."""

from __future__ import annotations

import io
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.cli import main
from anomap.feedback import FeedbackStore, model_hash
from anomap.update import UpdateWarning, update_model
from conftest import TINY, _normal, make_category

GTRANS = {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4, "smoothing_sigma": 1.0,
          "device": "cpu", "num_threads": 1, "min_heldout": 3, "checkpoint_every": 0, "max_steps": 2,
          "memory": "only"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _odd(seed: int, size: int = 64) -> np.ndarray:
    """Normal stripes turned and recoloured: a normal appearance the fit never saw (a false alarm)."""
    img = _normal(np.random.default_rng(seed), size)[:, ::-1].copy()
    img[..., 2] = 255 - img[..., 2]
    return img


def _fit(root: Path, method: str, cfg: dict) -> tuple[Path, Path]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_category(root / "cat", size=64, n_train=14, n_defect=4)
        det = anomap.create(method, **cfg).fit(data, progress=False)
        return data, det.save(root / "model.safetensors")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gtrans_model(tmp_path_factory) -> tuple[Path, Path]:
    return _fit(tmp_path_factory.mktemp("gtrans"), "gtrans", GTRANS)


@pytest.fixture(scope="module")
def ssl_ae_model(tmp_path_factory) -> tuple[Path, Path]:
    return _fit(tmp_path_factory.mktemp("ssl_ae"), "ssl_ae", {**TINY, "max_steps": 3})


def test_memory_update_makes_the_false_alarms_normal_and_keeps_the_rest(gtrans_model, tmp_path, capsys):
    data, model = gtrans_model
    det = anomap.load(model)
    odd = [_odd(s) for s in (99, 98, 97)]
    assert all(r.is_anomalous for r in det.predict(odd))  # false alarms of this model
    store = FeedbackStore(tmp_path / "fb")
    for i, img in enumerate(odd):
        store.add(_png(img), "normal", label=f"odd{i}.png", model_sha256=model_hash(model))
    defect = sorted((data / "test/spot").glob("*.png"))[0]
    store.add(defect.read_bytes(), "anomalous", label="spot.png", model_sha256=model_hash(model))
    others = sorted((data / "test").rglob("*.png"))
    before = np.array([r.score for r in det.predict(others)])

    out = tmp_path / "new.safetensors"
    rc = main(["update", str(model), "--feedback", str(tmp_path / "fb"), "--out", str(out), "--json",
               str(tmp_path / "r.json"), "-q"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| feedback normals above threshold | 3 / 3 (100.0%) | 0 / 3 (0.0%) |" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mode"] == "memory" and report["added"] == 3 and report["recalibrated"]
    assert report["records"] == {"total": 4, "normal": 3, "anomalous": 1, "both_verdicts": 0, "other_model": 0}
    assert report["calibration"]["n_heldout"] == {"before": 3, "after": 3}  # the added images are in-sample now
    new = anomap.load(out)
    assert not any(r.is_anomalous for r in new.predict(odd))
    assert new.predict(defect).is_anomalous and report["anomalous"]["above_after"] == 1
    after = np.array([r.score for r in new.predict(others)])
    assert np.abs(before.argsort().argsort() - after.argsort().argsort()).max() <= 1  # the others keep their order
    assert new.info["feedback_normals"] == 3 and new.info["added_normals"] == 3
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["odd0.png"]["flagged_before"] and not rows["odd0.png"]["flagged_after"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = update_model(out, tmp_path / "fb", tmp_path / "again.safetensors", progress=False)
    assert not [w for w in caught if w.category is UpdateWarning]  # feedback on the model it was updated from
    assert again["added"] == 0 and again["already_folded"] == 3 and not again["recalibrated"]  # folded once
    assert len(anomap.load(tmp_path / "again.safetensors").model.memory) == len(new.model.memory)


def test_memory_update_without_the_heldout_images_keeps_the_calibration(gtrans_model, tmp_path):
    data, model = gtrans_model
    moved = tmp_path / "moved.safetensors"
    det = anomap.load(model)
    det.info["dataset"] = str(tmp_path / "gone")
    det.save(moved)
    FeedbackStore(tmp_path / "fb").add(_png(_odd(99)), "normal", label="odd.png")
    with pytest.warns(UserWarning, match="held-out normal images were not found"):
        report = update_model(moved, tmp_path / "fb", tmp_path / "out.safetensors", progress=False)
    assert not report["recalibrated"] and report["heldout"]["n"] is None
    assert report["calibration"]["threshold"]["before"] == report["calibration"]["threshold"]["after"]
    assert anomap.load(tmp_path / "out.safetensors").info["added_normals"] == 1


def test_recalibration_of_a_model_without_a_memory_counts_the_feedback_normals(ssl_ae_model, tmp_path):
    data, model = ssl_ae_model
    fb_paths = sorted((data / "test/good").glob("*.png"))[:2]
    store = FeedbackStore(tmp_path / "fb")
    for p in fb_paths:
        store.add(p.read_bytes(), "normal", label=p.name, model_sha256="0" * 64)  # scored by another model
    store.add((data / "test/spot/000.png").read_bytes(), "anomalous", label="spot.png")
    store.add(fb_paths[1].read_bytes(), "anomalous", label="again.png")  # later: this one is a defect after all
    old = anomap.load(model)
    with pytest.warns(UpdateWarning) as caught:
        report = update_model(model, tmp_path / "fb", tmp_path / "new.safetensors", progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert "2 of 4 feedback record(s) were scored by another model" in said and "both verdicts" in said
    assert report["mode"] == "recalibration" and report["records"]["normal"] == 1
    assert report["records"]["anomalous"] == 2 and report["records"]["both_verdicts"] == 1

    new = anomap.load(tmp_path / "new.safetensors")
    n = old.calibration.n_heldout + 1
    assert new.calibration.n_heldout == n and new.info["feedback_normals"] == 1
    scores = sorted(r.score for r in new.predict([*new.heldout_paths(data), fb_paths[0]]))
    k = min(n, math.ceil((n + 1) * (1 - new.calibration.target_fpr)))  # the conformal order statistic
    assert new.calibration.order_k == k
    assert new.calibration.threshold == pytest.approx(scores[k - 1], rel=1e-5)
    assert sorted(new.calibration.heldout_scores) == pytest.approx(scores, rel=1e-5)


def test_update_errors_are_one_line(ssl_ae_model, tmp_path, capsys):
    data, model = ssl_ae_model

    def fails(*args: str) -> str:
        assert main(["update", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("anomap: error: ") and "\n" not in err and "Fix:" in err
        return err

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    out = str(tmp_path / "o.safetensors")
    assert "anomap export" in fails(str(onnx), "--feedback", str(tmp_path), "--out", out)
    assert "feedback folder not found" in fails(str(model), "--feedback", str(tmp_path / "nope"), "--out", out)
    (tmp_path / "empty").mkdir()
    assert "holds no feedback records" in fails(str(model), "--feedback", str(tmp_path / "empty"), "--out", out)
    store = FeedbackStore(tmp_path / "fb")
    store.add((data / "test/spot/000.png").read_bytes(), "anomalous", label="spot.png")
    assert "no `normal` records" in fails(str(model), "--feedback", str(tmp_path / "fb"), "--out", out)
    bad = store.add(b"this is not an image", "normal", label="x.png")
    assert bad.image_path.name in fails(str(model), "--feedback", str(tmp_path / "fb"), "--out", out)

    moved = tmp_path / "cat"
    shutil.copytree(data, moved)
    fb2 = FeedbackStore(tmp_path / "fb2")
    fb2.add((data / "test/good/000.png").read_bytes(), "normal")
    det = anomap.load(model)
    det.info["dataset"] = str(tmp_path / "gone")
    det.save(tmp_path / "far.safetensors")
    assert "--data" in fails(str(tmp_path / "far.safetensors"), "--feedback", str(tmp_path / "fb2"), "--out", out)
    assert not Path(out).exists()  # nothing is written after an error
    assert main(["update", str(tmp_path / "far.safetensors"), "--feedback", str(tmp_path / "fb2"), "--out", out,
                 "--data", str(moved), "-q"]) == 0
    done = capsys.readouterr()
    assert "recalibrated on 3 held-out + 1 feedback normals" in done.out and "another model" not in done.err
