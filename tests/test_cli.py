import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import anomap
from anomap.cli import main

SETS = ["--set", "image_size=32", "--set", "max_steps=6", "--set", "width=8", "--set", "batch_size=4",
        "--set", "min_heldout=3", "--set", "device=cpu", "--set", "num_threads=1"]


def test_fit_evaluate_report_predict(tiny_category, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert main(["fit", "--method", "ssl_ae", "--data", str(tiny_category), "--out", str(model), "-q", *SETS]) == 0
    assert model.exists() and not (tmp_path / "m.safetensors.partial").exists()
    metrics, rows, html = tmp_path / "metrics.json", tmp_path / "rows.csv", tmp_path / "r.html"
    assert main(["evaluate", "--model", str(model), "--data", str(tiny_category), "--out", str(metrics),
                 "--rows", str(rows), "-q"]) == 0
    m = json.loads(metrics.read_text())["metrics"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max"):
        assert 0.0 <= m[key] <= 1.0
    assert rows.read_text().count("\n") == 1 + 8
    # a scoring-only change on the saved model (ablations), recalibrated on its held-out normals
    assert main(["evaluate", "--model", str(model), "--data", str(tiny_category), "--out", str(metrics),
                 "--set", "image_score=topk_mean", "smoothing_sigma=1", "-q"]) == 0
    assert json.loads(metrics.read_text())["scoring_overrides"] == {"image_score": "topk_mean", "smoothing_sigma": 1}
    assert main(["evaluate", "--model", str(model), "--data", str(tiny_category), "--set", "width=8", "-q"]) == 2
    assert main(["report", "--model", str(model), "--data", str(tiny_category), "--out", str(html), "-q"]) == 0
    text = html.read_text()
    assert "data:image/png;base64" in text and "<svg" in text
    out_csv, ov = tmp_path / "pred.csv", tmp_path / "ov"
    assert main(["predict", "--model", str(model), str(tiny_category / "test"), "--out", str(out_csv),
                 "--overlays", str(ov), "-q"]) == 0
    assert len(list(ov.glob("*_overlay.png"))) == 8
    assert out_csv.read_text().splitlines()[0] == "path,score,is_anomalous,threshold,status,error"


def test_roundtrip_in_new_process_gives_identical_predictions(tiny_category, tiny_cfg, tmp_path):
    det = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, progress=False)
    model = det.save(tmp_path / "m.safetensors")
    img = min((tiny_category / "test/spot").glob("*.png"))
    here = det.predict(img)
    # Bit-identical is promised on one machine at one thread count (docs/reliability.md): the child
    # uses this process's count, not its own default (the number of cores, which varies by machine).
    code = (
        "import anomap, numpy as np, sys, torch; torch.set_num_threads(int(sys.argv[4]));"
        "d = anomap.load(sys.argv[1]); r = d.predict(sys.argv[2]);"
        "np.save(sys.argv[3], r.anomaly_map); print(repr(r.score))"
    )
    argv = [str(model), str(img), str(tmp_path / "map.npy"), str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == here.score
    assert np.array_equal(np.load(tmp_path / "map.npy"), here.anomaly_map)
    loaded = anomap.load(model)
    assert loaded.calibration.threshold == det.calibration.threshold


@pytest.mark.parametrize("argv,needle", [
    (["fit", "--data", "/nonexistent/x", "--out", "m.safetensors"], "/nonexistent/x"),
    (["fit", "--data", ".", "--out", "m.safetensors", "--set", "bogus=1"], "unknown config key"),
    (["evaluate", "--model", "/nonexistent/m.safetensors", "--data", "."], "/nonexistent/m.safetensors"),
    (["fit", "--method", "nope", "--data", ".", "--out", "m.safetensors"], "unknown method 'nope'"),
])
def test_errors_are_one_line_and_nonzero(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anomap: error:") and needle in err and "\n" not in err and "Traceback" not in err


def test_methods_lists_ssl_ae(capsys):
    assert main(["methods"]) == 0
    assert "ssl_ae" in capsys.readouterr().out
