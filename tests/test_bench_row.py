"""anomap.bench: one Markdown row per benchmark record, appended to a file in a run folder."""

from pathlib import Path

from anomap.bench import HEADER, SEP, _append, row
from anomap.cli import build_parser


def _rec(sets: list[str]) -> dict:
    return {
        "dataset": "toy", "method": "gtrans", "sets": sets, "image_size": 224,
        "metrics": {"image_auroc": 0.91234, "pixel_auroc": 0.8, "aupro": None, "image_f1max": 0.5,
                    "test_fpr": 0.05, "test_recall": 0.6},
        "fit_seconds": 12.34, "ms_per_image_bs1": 31.96, "peak_rss_mb": 900.4,
        "info": {"steps": {"gtrans": 100}, "stopped_by": "schedule"},
    }


def test_row_has_one_cell_per_header_column_and_formats_values():
    cells = row(_rec(["image_size=256"]), "a label").strip("|").split("|")
    assert len(cells) == HEADER.count("|") - 1
    cells = [c.strip() for c in cells]
    assert cells[:5] == ["toy", "gtrans", "0.912", "0.800", "n/a"]
    assert cells[6] == "0.05 / 0.60"
    assert cells[7:12] == ["12.3", "32.0", "900", "224", "100 (schedule)"]
    assert cells[12] == "image_size=256; a label"


def test_the_test_fpr_stands_beside_what_the_threshold_promised():
    rec = _rec([])
    rec["info"].update(promised_fpr=0.04225, fpr_upper95=0.08721)
    cells = [c.strip() for c in row(rec).strip("|").split("|")]
    assert len(cells) == HEADER.count("|") - 1
    assert cells[6] == "0.05 (promise <=0.042, 95% <=0.087) / 0.60"


def test_the_image_size_cell_names_a_working_shape_that_is_not_the_square():
    rec = _rec([])
    rec["info"]["work_shape"] = [224, 224]
    assert [c.strip() for c in row(rec).strip("|").split("|")][10] == "224"
    rec["info"]["work_shape"] = [192, 512]
    assert [c.strip() for c in row(rec).strip("|").split("|")][10] == "192x512"


def test_label_equal_to_the_overrides_is_written_once():
    assert row(_rec(["image_size=256"]), "image_size=256").endswith("| image_size=256 |")
    assert row(_rec([]), "").endswith("|  |")
    assert row(_rec([]), "only label").endswith("| only label |")


def test_bench_out_defaults_to_a_run_folder_not_the_docs():
    args = build_parser().parse_args(["bench", "--data", "some/category"])
    assert args.out == "runs/bench/benchmarks.md"
    assert Path(args.out).parent == Path(args.runs_dir)


def test_rows_are_appended_under_their_command_line_in_a_new_folder(tmp_path):
    out = tmp_path / "runs" / "bench" / "benchmarks.md"
    _append(out, ["| a |"], "anomap bench --data d")
    _append(out, ["| b |"], "anomap bench --data e")
    text = out.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count(HEADER) == 2 and text.count(SEP) == 2
    assert text.index("`anomap bench --data d`") < text.index("| a |") < text.index("`anomap bench --data e`")
    assert text.index("`anomap bench --data e`") < text.index("| b |")
