"""The ``anomap`` command line: methods | fit | predict | evaluate | report | bench | demo."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from anomap.errors import AnomapError, DataError

EPILOG = "Config: --config FILE.yaml and/or --set key=value (repeatable, strict: unknown keys are errors)."


def _config(args: argparse.Namespace, method: str) -> dict[str, Any]:
    from anomap.config import load_yaml, parse_overrides

    cfg: dict[str, Any] = {}
    if getattr(args, "config", None):
        cfg.update(load_yaml(args.config, prefix=method))
    cfg.update(parse_overrides(getattr(args, "set", None) or [], prefix=method))
    if getattr(args, "device", None):
        cfg["device"] = args.device
    if getattr(args, "max_minutes", None) is not None:
        cfg["max_train_seconds"] = float(args.max_minutes) * 60.0
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config values (flat, or nested under the method name)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override config values, e.g. --set max_steps=500 teacher.arch=efficientnet_lite1 "
                        "(repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")


def _write_json(path: Path, data: Any) -> None:
    from anomap.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def cmd_methods(args: argparse.Namespace) -> int:
    import anomap
    from anomap.config import config_to_dict
    from anomap.registry import get_method_class

    for name in anomap.list_methods():
        cls = get_method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
        if args.verbose:
            for k, v in config_to_dict(cls.Config()).items():
                print(f"    {k} = {v}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import anomap

    det = anomap.create(args.method, **_config(args, args.method))
    out = Path(args.out)
    det.fit(args.data, out=out, resume=args.resume, progress=not args.quiet)
    info = det.info
    print(f"trained {args.method} on {info['n_fit']} images ({info['n_heldout']} held out) in "
          f"{info['fit_seconds']:.1f} s; stopped by {info['stopped_by']}; threshold "
          f"{det.calibration.threshold:.6g}; saved {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import anomap
    from anomap.data.images import is_image_file

    det = anomap.load(args.model, device=args.device)
    paths: list[Path] = []
    names: dict[Path, str] = {}  # overlay file name: path relative to the folder given, '/' -> '__'
    for item in args.inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)
                           and not f.name.startswith("."))
            paths.extend(found)
            names.update({f: "__".join(f.relative_to(p).with_suffix("").parts) for f in found})
        elif p.exists():
            paths.append(p)
        else:
            raise DataError("input not found.", path=p, fix="give an image file or a folder of images")
    if not paths:
        raise DataError("no PNG/JPEG/BMP/TIFF images found in the input(s).", path=", ".join(args.inputs),
                        fix="give image files or folders that contain images")
    rows = []
    if args.overlays:
        from anomap.data.images import load_image, save_png_atomic
        from anomap.report.overlay import heatmap_overlay, side_by_side
        Path(args.overlays).mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for p in tqdm(paths, desc="scoring", unit="img", disable=args.quiet or len(paths) < 5):
        res = det.predict(p)
        rows.append({"path": str(p), "score": res.score, "is_anomalous": res.is_anomalous})
        if args.overlays:
            img = load_image(p, channels=det.channels)
            cal = det.calibration
            ov = heatmap_overlay(img, res.anomaly_map, cal.map_low or 0.0, cal.map_scale or 1.0)
            save_png_atomic(Path(args.overlays) / f"{names.get(p, p.stem)}_overlay.png", side_by_side([img, ov]))
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".json":
            _write_json(out, {"threshold": det.calibration.threshold, "results": rows})
        else:
            _write_csv(out, rows)
    for r in rows:
        print(f"{r['score']:.6g}\t{'ANOMALOUS' if r['is_anomalous'] else 'ok'}\t{r['path']}")
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    from anomap.fileio import atomic_write_text

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _evaluate(args: argparse.Namespace):
    import anomap

    det = anomap.load(args.model, device=args.device)
    result = anomap.evaluate(det, args.data, progress=not args.quiet)
    return det, result


def _print_metrics(result) -> None:
    for k, v in result.metrics.items():
        print(f"{k:14s} {'n/a' if v is None else f'{v:.4f}'}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    det, result = _evaluate(args)
    _print_metrics(result)
    if args.out:
        _write_json(Path(args.out), {"metrics": result.metrics, "per_defect": result.per_defect,
                                     "info": result.info})
    if args.rows:
        _write_csv(Path(args.rows), result.rows)
    if args.report:
        from anomap.report.build import write_report

        print(f"report: {write_report(det, result, args.report)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from anomap.report.build import write_report

    det, result = _evaluate(args)
    _print_metrics(result)
    print(f"report: {write_report(det, result, args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import anomap
    from anomap.data.demo import build_demo
    from anomap.report.build import write_report

    out = Path(args.out)
    data = build_demo(out / "demo_data")
    print(f"demo data: {data}")
    cfg = _config(args, args.method)
    if args.method == "ssl_ae":
        cfg.setdefault("min_steps", 0)  # the demo trains the plain 30-epoch schedule (~2 min on 2 cores)
    det = anomap.create(args.method, **cfg)
    det.fit(data, out=out / "model.safetensors", resume=args.resume, progress=not args.quiet)
    result = anomap.evaluate(det, data, progress=not args.quiet)
    _print_metrics(result)
    _write_json(out / "metrics.json", {"metrics": result.metrics, "per_defect": result.per_defect,
                                       "info": {**result.info, "fit": det.info}})
    print(f"report: {write_report(det, result, out / 'report.html')}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from anomap.bench import run_bench

    return run_bench(args.data, args.method, sets=args.set or [], out=Path(args.out),
                     runs_dir=Path(args.runs_dir), max_minutes=args.max_minutes, label=args.label)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anomap", description="Unsupervised visual anomaly detection: "
                                 "train on good images, score and localise defects.", epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("methods", help="list the available methods")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each method's default config")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("fit", help="train a detector on normal images", epilog=EPILOG)
    p.add_argument("--method", default="ssl_ae", help="method name (see `anomap methods`)")
    p.add_argument("--data", required=True, help="category folder (MVTec layout) or folder of normal images")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial after a crash/stop")
    p.add_argument("--max-minutes", type=float, help="training time budget in minutes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images or folders; CSV/JSON and heat-map overlays")
    p.add_argument("--model", required=True, help="trained .safetensors file")
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", help="write results to .csv or .json")
    p.add_argument("--overlays", help="folder for heat-map overlay PNGs")
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    for name, helptext in (("evaluate", "metrics on test/ (JSON) and per-image rows (CSV)"),
                           ("report", "evaluate and write the HTML report")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="trained .safetensors file")
        p.add_argument("--data", required=True, help="category folder with test/ and ground_truth/")
        p.add_argument("--device", help="cpu, cuda or auto")
        p.add_argument("-q", "--quiet", action="store_true")
        if name == "evaluate":
            p.add_argument("--out", help="metrics JSON file")
            p.add_argument("--rows", help="per-image CSV file")
            p.add_argument("--report", help="also write the HTML report here")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.add_argument("--out", required=True, help="HTML file to write")
            p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="build the demo category, train, evaluate, write the report", epilog=EPILOG)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--method", default="ssl_ae")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("-q", "--quiet", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="train + evaluate method x dataset pairs; Markdown table rows")
    p.add_argument("--data", nargs="+", required=True, help="category folders")
    p.add_argument("--method", nargs="+", default=["ssl_ae"])
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="config overrides for every run")
    p.add_argument("--out", default="docs/benchmarks.md", help="Markdown file the rows are appended to")
    p.add_argument("--runs-dir", default="runs/bench", help="where models, metrics and reports go")
    p.add_argument("--max-minutes", type=float, help="training time budget per run")
    p.add_argument("--label", default="", help="note for the table's notes column")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AnomapError as e:
        if args.debug:
            raise
        print(f"anomap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomap: interrupted (a resumable checkpoint is kept where training had one: use --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
