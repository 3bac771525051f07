"""anomap.bench.suite and anomap.bench.compare on synthetic runs folders: suite means, paired intervals,
the adoption verdicts, and the CLI (`anomap bench --suite / --compare`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from anomap.bench.compare import compare_folders, compare_markdown
from anomap.bench.suite import draws, load_run, load_runs, suite_for_runs
from anomap.cli import build_parser, main
from anomap.errors import DataError
from anomap.metrics.bootstrap import SummaryBuilder, dataset_rng, interval, stratified_weights
from anomap.metrics.pro import aupro_exact
from anomap.metrics.roc import auroc, pixel_auroc
from anomap.types import Sample

SIZE = 24


def _dataset(name: str, n_good: int = 30, n_def: int = 30):
    """Masks and the per-image 'difficulty' every method shares (seeded by the dataset's name)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    n = n_good + n_def
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n_good, n):
        y, x = rng.integers(0, SIZE - 8, 2)
        h, w = rng.integers(3, 8, 2)
        masks[i, y:y + h, x:x + w] = True
    difficulty = rng.normal(0, 1.0, n)  # how anomalous an image looks to any method
    noise = ndimage.gaussian_filter(rng.normal(size=(n, SIZE, SIZE)), sigma=(0, 1.5, 1.5))
    return masks, difficulty, noise, np.r_[np.zeros(n_good, int), np.ones(n_def, int)]


def make_run(root: Path, dataset: str, method: str, gain: float, jitter: int = 0) -> Path:
    """A bench run folder whose maps separate defects by ``0.5 + gain`` (plus what the images share)."""
    masks, difficulty, noise, labels = _dataset(dataset)
    own = np.random.default_rng(1000 + jitter)  # a little noise of the method's own
    maps = (noise + 0.1 * own.normal(size=noise.shape)
            + masks * (0.5 + gain + 0.4 * difficulty[:, None, None])).astype(np.float32)
    scores = maps.reshape(len(maps), -1).max(1) + 0.15 * difficulty + 0.02 * own.normal(size=len(maps))
    samples = [Sample(Path(f"/{dataset}/test/{'spot' if y else 'good'}/{i:03d}.png"), int(y),
                      "spot" if y else "good") for i, y in enumerate(labels)]
    run = root / f"{dataset}-{method}"
    (run / "spool").mkdir(parents=True)
    b = SummaryBuilder(run / "spool", SIZE)
    for i in range(0, len(labels), 16):
        b.add(samples[i:i + 16], scores[i:i + 16], maps[i:i + 16], masks[i:i + 16])
    exact = {"image_auroc": auroc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks)[0],
             "aupro": aupro_exact(maps, masks)}
    b.finish({"dataset": dataset, "method": method, "exact": exact}).save(run / "summaries.npz")
    (run / "spool").rmdir()
    (run / "bench.json").write_text(json.dumps({"dataset": dataset, "method": method, "metrics": exact}))
    return run


def make_runs(root: Path, method: str, gains: dict[str, float], jitter: int = 0) -> Path:
    for ds, g in gains.items():
        make_run(root, ds, method, g, jitter)
    return root


DATASETS = ("d1", "d2", "d3")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": make_runs(root / "a", "base", dict.fromkeys(DATASETS, 0.0)),
        "better": make_runs(root / "better", "new", dict.fromkeys(DATASETS, 0.25), jitter=1),
        "one_drop": make_runs(root / "one_drop", "new", {"d1": 0.5, "d2": 0.5, "d3": -0.25}, jitter=2),
        "small_drop": make_runs(root / "small_drop", "new", {"d1": 0.3, "d2": 0.3, "d3": -0.005}, jitter=3),
        "same": make_runs(root / "same", "base", dict.fromkeys(DATASETS, 0.0)),
    }


def test_a_better_method_is_adopted_and_the_reverse_kept(folders) -> None:
    res = compare_folders(folders["a"], folders["better"])
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        assert res["suite"][m]["value"] > 0 and res["verdicts"][m]["verdict"] == "adopt", (m, res["verdicts"][m])
        s = res["suite"][m]
        assert s["lo"] <= s["value"] <= s["hi"]
        for ds in DATASETS:
            p = res["datasets"][ds][m]
            assert p["value"] == pytest.approx(p["b"] - p["a"])
    back = compare_folders(folders["better"], folders["a"])
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        assert back["verdicts"][m]["verdict"] == "keep" and "is not above 0" in back["verdicts"][m]["reason"]
        assert back["suite"][m]["value"] == pytest.approx(-res["suite"][m]["value"])


def test_a_drop_on_one_dataset_beyond_its_interval_keeps_a(folders) -> None:
    res = compare_folders(folders["a"], folders["one_drop"])
    for m in ("pixel_auroc", "aupro"):
        assert res["suite"][m]["value"] > 0  # the mean rises ...
        assert res["datasets"]["d3"][m]["hi"] < 0  # ... but d3 drops beyond its interval
        assert res["verdicts"][m]["verdict"] == "keep" and "d3 drops" in res["verdicts"][m]["reason"]
        assert all(res["datasets"][ds][m]["lo"] > 0 for ds in ("d1", "d2"))


def test_a_drop_within_its_interval_does_not_block_adoption(folders) -> None:
    res = compare_folders(folders["a"], folders["small_drop"])
    for m in ("pixel_auroc", "aupro"):
        d3 = res["datasets"]["d3"][m]
        assert d3["value"] < 0 < d3["hi"] and res["suite"][m]["value"] > 0  # d3 a little lower, within its interval
        assert res["verdicts"][m]["verdict"] == "adopt"


def test_the_same_method_twice_is_kept_with_zero_width_intervals(folders) -> None:
    res = compare_folders(folders["a"], folders["same"])
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        assert res["suite"][m] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
        assert res["verdicts"][m]["verdict"] == "keep"


def test_pairing_makes_the_interval_of_a_difference_narrower(folders) -> None:
    """Both methods find the same images hard, so resampling them alike cancels that out of B - A."""
    a, b = load_run(folders["a"] / "d1-base"), load_run(folders["better"] / "d1-new")
    labels = a.summaries.labels
    w = stratified_weights(labels, 1000, dataset_rng("d1"))
    w_other = stratified_weights(labels, 1000, dataset_rng("d1", seed=7))
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        paired = interval(draws(b, weights=w)[m] - draws(a, weights=w)[m])
        unpaired = interval(draws(b, weights=w)[m] - draws(a, weights=w_other)[m])
        width_p, width_u = paired[1] - paired[0], unpaired[1] - unpaired[0]
        assert width_p < 0.6 * width_u, (m, width_p, width_u)
    res = compare_folders(folders["a"], folders["better"])
    assert res["datasets"]["d1"]["image_auroc"]["hi"] - res["datasets"]["d1"]["image_auroc"]["lo"] == pytest.approx(
        interval(draws(b, weights=w)["image_auroc"] - draws(a, weights=w)["image_auroc"])[1]
        - interval(draws(b, weights=w)["image_auroc"] - draws(a, weights=w)["image_auroc"])[0])


def test_suite_mean_is_the_mean_of_the_exact_values_with_an_interval(folders) -> None:
    runs = load_runs(folders["a"])
    stats = suite_for_runs(runs)["base"]
    assert stats["n_datasets"] == 3 and stats["resamples"] == 1000
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        values = [r.summaries.meta["exact"][m] for r in runs]
        s = stats["suite"][m]
        assert s["value"] == pytest.approx(np.mean(values))
        assert s["lo"] < s["value"] < s["hi"] and s["hi"] - s["lo"] < 0.2
        for r in runs:
            d = stats["datasets"][r.dataset][m]
            assert d["lo"] <= d["value"] <= d["hi"] or m == "image_auroc"
            # the suite's interval is narrower than a single dataset's (independent datasets average out)
            assert s["hi"] - s["lo"] < d["hi"] - d["lo"]
    assert 0 < stats["binning_max_error"]["pixel_auroc"] < 1e-2


def test_errors_are_one_line(folders, tmp_path) -> None:
    with pytest.raises(DataError, match="holds no bench runs") as e:
        load_runs(tmp_path)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    mixed = tmp_path / "mixed"
    make_run(mixed, "d1", "x", 0.0)
    make_run(mixed, "d1", "y", 0.1)
    with pytest.raises(DataError, match="runs of x and y on d1"):
        compare_folders(folders["a"], mixed)
    res = compare_folders(folders["a"], mixed, methods=("base", "y"))
    assert list(res["datasets"]) == ["d1"] and res["only_in_a"] == ["d2", "d3"]
    other = tmp_path / "other"
    make_run(other, "zz", "base", 0.0)
    with pytest.raises(DataError, match="no dataset in common"):
        compare_folders(folders["a"], other)
    old = tmp_path / "old" / "d1-base"
    old.mkdir(parents=True)
    (old / "bench.json").write_text(json.dumps({"dataset": "d1", "method": "base"}))
    with pytest.raises(DataError, match="has no per-image summaries"):
        load_runs(tmp_path / "old")


def test_different_test_images_are_refused(folders, tmp_path) -> None:
    run = make_run(tmp_path / "b", "d1", "new", 0.1)
    s = load_run(run).summaries
    s.names[0] = "good/other.png"
    s.save(run / "summaries.npz")
    with pytest.raises(DataError, match="scored different test images"):
        compare_folders(folders["a"], tmp_path / "b")


def test_cli_compare_prints_a_table_and_verdicts_and_writes_json(folders, tmp_path, capsys) -> None:
    out, js = tmp_path / "bench.md", tmp_path / "cmp.json"
    assert main(["bench", "--compare", str(folders["a"]), str(folders["better"]), "--out", str(out),
                 "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "| d1 | base → new | 60 |" in printed and "**suite mean (3)**" in printed
    assert printed.count("**adopt**") == 3
    res = json.loads(js.read_text())
    assert res["verdicts"]["aupro"]["verdict"] == "adopt" and set(res["datasets"]) == set(DATASETS)
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "Δ AUPRO@0.3" in text and "- pixel AUROC: **adopt**" in text
    md = compare_markdown(res)
    assert md[2].count("|") == md[3].count("|") == md[4].count("|")  # header, separator, rows line up


def test_cli_suite_and_the_bench_arguments(folders, tmp_path, capsys) -> None:
    out = tmp_path / "bench.md"
    assert main(["bench", "--suite", str(folders["a"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| base | **suite mean (3)** |" in printed and "95% bootstrap intervals" in printed
    assert (folders["a"] / "suite.json").exists() and "suite mean" in out.read_text()
    args = build_parser().parse_args(["bench", "--data", "x", "y"])
    assert args.data == ["x", "y"] and args.method is None and args.compare is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--data", "x", "--compare", "a", "b"])
    assert main(["bench", "--compare", "a", "b", "--method", "m1", "m2", "m3"]) == 2
    assert "one or two methods" in capsys.readouterr().err
