"""`anomap bench` end to end on a tiny category: the row, summaries.npz beside bench.json, the suite block."""

from __future__ import annotations

import json

import pytest

from anomap.bench import run_bench
from anomap.bench.suite import load_run
from conftest import make_category

SETS = ["image_size=32", "max_steps=3", "width=8", "batch_size=4", "device=cpu", "min_heldout=3", "num_threads=1",
        "eval_size=32"]


def test_bench_writes_summaries_and_a_suite_block(tmp_path, capsys) -> None:
    data = make_category(tmp_path / "tiny", n_train=10, n_good=5, n_defect=5)
    out, runs = tmp_path / "bench.md", tmp_path / "runs"
    assert run_bench([str(data)], ["ssl_ae"], SETS, out, runs) == 0
    run_dir = runs / "tiny-ssl_ae"
    rec = json.loads((run_dir / "bench.json").read_text())
    assert rec["summaries"] == "summaries.npz"
    run = load_run(run_dir)
    s = run.summaries
    assert s.n == 10 and s.meta["eval_size"] == 32 and s.meta["method"] == "ssl_ae"
    assert sorted(set(s.names.tolist())) == sorted(f"{c}/{i:03d}.png" for c in ("good", "spot") for i in range(5))
    binned = {k: float(v[0]) for k, v in s.metrics().items()}
    assert binned["image_auroc"] == pytest.approx(rec["metrics"]["image_auroc"], abs=1e-12)
    for key in ("pixel_auroc", "aupro"):
        assert abs(binned[key] - rec["metrics"][key]) <= binned[f"{key}_max_error"] + rec["info"][f"{key}_max_error"]
        assert run.point(key) == rec["metrics"][key]
    text = out.read_text()
    assert text.index("| tiny | ssl_ae |") < text.index("| ssl_ae | **suite mean (1)** |")
    suite = json.loads((runs / "suite.json").read_text())
    assert suite["ssl_ae"]["suite"]["aupro"]["value"] == pytest.approx(rec["metrics"]["aupro"])
    assert "**suite mean (1)**" in capsys.readouterr().out
