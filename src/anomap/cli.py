"""The ``anomap`` command line: methods | fit | predict | evaluate | report | export | serve | bench | demo."""

from __future__ import annotations

import argparse
import csv
import json
import os
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


def _need(path: str | Path, kind: str, fix: str) -> Path:
    """An input path that must exist (``kind`` "folder" or "file"), checked before any work starts."""
    from anomap.errors import CheckpointError

    p = Path(path)
    err = CheckpointError if kind == "model file" else DataError
    if not p.exists():
        raise err(f"{kind} not found.", path=p, fix=fix)
    if kind == "folder" and not p.is_dir():
        raise err("is not a folder.", path=p, fix=fix)
    if kind != "folder" and not p.is_file():
        raise err(f"is not a file (a {kind} is expected).", path=p, fix=fix)
    return p


def _writable(path: str | Path | None, what: str) -> None:
    """An output file that can be written: not a folder, under a folder that exists or can be made."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise DataError(f"the {what} is a folder.", path=p, fix="give a file name (the folder may stay)")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"cannot create the {what}: {parent} is a file, not a folder.", path=p,
                        fix="choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot create the {what}: no write permission in {parent}.", path=p,
                        fix="choose a folder you can write to")


def _check_device(args: argparse.Namespace) -> None:
    if getattr(args, "device", None):
        from anomap.config import check_device

        check_device(args.device)


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

    _need(args.data, "folder", "give the category folder (with train/good) or a folder of normal images")
    _writable(args.out, "output model file")
    det = anomap.create(args.method, **_config(args, args.method))
    out = Path(args.out)
    det.fit(args.data, out=out, resume=args.resume, progress=not args.quiet)
    info = det.info
    if info.get("rank", 0):  # torchrun: the other processes trained their shards; rank 0 reports
        return 0
    procs = f" by {info['processes']} processes" if info.get("processes", 1) > 1 else ""
    print(f"trained {args.method} on {info['n_fit']} images ({info['n_heldout']} held out) in "
          f"{info['fit_seconds']:.1f} s{procs}; stopped by {info['stopped_by']}; threshold "
          f"{det.calibration.threshold:.6g}; saved {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score files/folders/globs in batches. Exit 0: every file scored; 1: some were skipped (listed)."""
    from tqdm import tqdm

    from anomap.export.backend import load_backend
    from anomap.export.batch import RowWriter, collect_inputs, predict_stream

    if args.model:
        model, inputs = args.model, list(args.inputs)
    elif len(args.inputs) >= 2:
        model, inputs = args.inputs[0], list(args.inputs[1:])
    else:
        raise DataError("give a model file and at least one image, folder or pattern.",
                        path=args.inputs[0], fix="anomap predict MODEL.safetensors|MODEL.onnx DIR_OR_GLOB...")
    paths, names = collect_inputs(inputs)  # input errors first: nothing is loaded or written for a typo
    _need(model, "model file", "give a .safetensors (or .onnx) file written by `anomap fit` / `anomap export`")
    _check_device(args)
    _writable(args.out, "output file")
    backend = load_backend(model, args.backend, device=args.device, threads=args.threads,
                           batch_size=args.batch_size, compile=args.compile)
    thr = backend.calibration.threshold if args.threshold is None else args.threshold
    writer = RowWriter(args.out, thr, {"model": str(model), "backend": backend.name, "method": backend.method}) \
        if args.out else None
    n_ok = n_bad = n_anom = 0
    bar = tqdm(total=len(paths), desc="scoring", unit="img", disable=args.quiet or len(paths) < 5)
    try:
        for row in predict_stream(backend, paths, batch_size=args.batch_size, threshold=args.threshold,
                                  overlays=args.overlays, names=names):
            bar.update(1)
            if row["status"] == "ok":
                n_ok += 1
                n_anom += bool(row["is_anomalous"])
            else:
                n_bad += 1
                bar.write(f"anomap: skipped {row['path']}: {row['error']}", file=sys.stderr)
            if writer is not None:
                writer.write(row)
            else:
                verdict = "-" if row["is_anomalous"] is None else "ANOMALOUS" if row["is_anomalous"] else "ok"
                score = "error" if row["score"] is None else f"{row['score']:.6g}"
                print(f"{score}\t{verdict if row['status'] == 'ok' else 'SKIPPED'}\t{row['path']}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    summary = {"scored": n_ok, "skipped": n_bad, "anomalous": n_anom, "threshold": thr}
    if writer is not None:
        writer.close(summary)
    thr_text = "none" if thr is None else f"{thr:.6g}"
    print(f"scored {n_ok} image(s) with {backend.name} ({n_anom} anomalous at threshold {thr_text}); "
          f"skipped {n_bad}" + (f"; results: {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if n_bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from anomap.export.onnx import export_onnx

    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    rep = export_onnx(args.model, out, opset=args.opset, parity_images=args.images, tol=args.tol,
                      parity=not args.no_parity)
    par = rep["parity"]
    if par is None:
        print(f"exported {rep['method']} to {out} ({rep['bytes'] / 1e6:.1f} MB); parity NOT checked (--no-parity)")
    else:
        print(f"exported {rep['method']} to {out} ({rep['bytes'] / 1e6:.1f} MB, opset {rep['opset']}, "
              f"{rep['seconds']:.1f} s)")
        print(f"parity on {par['n_images']} images ({rep['images_from']}): max |map diff| "
              f"{par['max_map_diff']:.2e} (normalised), max |score diff| {par['max_score_diff']:.2e} "
              f"(/ threshold), verdict flips {par['verdict_flips']}; tolerance {par['tol']:g}: passed")
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
    from anomap.config import parse_overrides

    _need(args.data, "folder", "give the category folder that contains test/ and ground_truth/")
    _need(args.model, "model file", "give a .safetensors file written by `anomap fit`")
    _check_device(args)
    for attr, what in (("out", "output file"), ("rows", "rows file"), ("report", "report file")):
        _writable(getattr(args, attr, None), what)
    det = anomap.load(args.model, device=args.device)
    if args.set:  # scoring-only changes (ablations): recalibrated on the model's held-out normals
        det.rescore(parse_overrides(args.set, prefix=det.method_name), args.data, progress=not args.quiet)
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
                                     "info": result.info, "scoring_overrides": det.info.get("rescored", {})})
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


def _byte_size(text: str) -> int:
    """argparse type: a byte count, plain or with a k/M/G suffix (powers of 1024): 20M, 512k, 1048576."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes, e.g. 20M, 512k or 1048576") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return n


def cmd_serve(args: argparse.Namespace) -> int:
    from anomap.errors import ConfigError

    try:
        import uvicorn

        from anomap.serve.app import API_KEY_ENV, create_app
        from anomap.serve.limits import Limits
    except ImportError as e:
        raise ConfigError(f"`anomap serve` needs the serve extra ({e.name} is not installed).",
                          fix="pip install 'anomap[serve]'") from None
    from anomap.export.backend import load_backend
    from anomap.train.loop import set_threads

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port.", fix="give a port from 1 to 65535, e.g. 8000")
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_files=args.max_files,
                    timeout_s=args.timeout, concurrency=args.concurrency, queue=args.queue)
    set_threads(args.threads)
    if args.compile:
        print("anomap serve: compiling the model for batches of 1 (tens of seconds, once)...", file=sys.stderr)
    backend = load_backend(args.model, args.backend, device=args.device, threads=args.threads,
                           **({"batch_size": 1, "compile": True} if args.compile else {}))
    app = create_app(backend, limits=limits, cors_origins=args.cors_origin or ())
    keyed = bool(os.environ.get(API_KEY_ENV))
    print(f"anomap serve: {backend.method} ({backend.name} backend) on http://{args.host}:{args.port}/ "
          f"(API docs /docs); API key {'required' if keyed else 'not required'}", file=sys.stderr)
    if not keyed and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"anomap serve: warning: listening on {args.host} without an API key; set {API_KEY_ENV} to "
              "require one", file=sys.stderr)
    # uvicorn's own connection cap is a backstop above the service's admission limit (503 either way)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                limit_concurrency=limits.concurrency + limits.queue + 64, timeout_keep_alive=5)
    return 0


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

    p = sub.add_parser("predict", help="score images, folders or glob patterns; CSV/JSON and heat-map overlays",
                       description="anomap predict MODEL DIR_OR_GLOB... (MODEL: .safetensors or .onnx). Exit code "
                       "0 when every file was scored, 1 when some were skipped (they are listed with "
                       "status=error), 2 on an error that stops the run.")
    p.add_argument("inputs", nargs="+", metavar="MODEL_AND_INPUTS",
                   help="the model file, then image files, folders (recursive) and/or glob patterns")
    p.add_argument("--model", help="the model file (alternative to giving it first)")
    p.add_argument("--backend", choices=["torch", "onnx"],
                   help="runtime (default: onnx for a .onnx model, else torch)")
    p.add_argument("--out", help="write results to .csv or .json (path, score, is_anomalous, threshold, status, "
                   "error)")
    p.add_argument("--overlays", help="folder for heat-map overlay PNGs")
    p.add_argument("--threshold", type=float, help="score threshold (default: the calibrated one)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (onnx backend; default 2)")
    p.add_argument("--device", help="cpu, cuda or auto (torch backend)")
    p.add_argument("--compile", action="store_true", help="torch backend: compile the model with torch.compile "
                   "first (tens of seconds once, then faster; worth it for large folders)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model to ONNX, with a parity check against PyTorch")
    p.add_argument("model", help="trained .safetensors file")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", help="output file (default: MODEL with suffix .onnx)")
    p.add_argument("--images", help="folder of real images for the parity check (default: the model's "
                   "held-out normal images, when its training folder still exists)")
    p.add_argument("--tol", type=float, default=1e-3, help="parity tolerance on normalised maps and "
                   "scores/threshold (default 1e-3)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    p.set_defaults(func=cmd_export)

    for name, helptext in (("evaluate", "metrics on test/ (JSON) and per-image rows (CSV)"),
                           ("report", "evaluate and write the HTML report")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="trained .safetensors file")
        p.add_argument("--data", required=True, help="category folder with test/ and ground_truth/")
        p.add_argument("--device", help="cpu, cuda or auto")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                       help="change scoring-only settings of the saved model (e.g. pixel_map=prob); it is "
                            "recalibrated on its held-out normal images from --data")
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

    p = sub.add_parser("serve", help="prediction service (REST API + web page) for one model",
                       description="anomap serve MODEL: POST /v1/predict, GET /v1/model, GET /healthz, docs at "
                       "/docs, web page at /. Set ANOMAP_API_KEY to require the X-API-Key header on /v1/*.")
    p.add_argument("model", help="trained .safetensors file or exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="runtime (default: onnx for a .onnx model, else torch)")
    p.add_argument("--device", help="cpu, cuda or auto (torch backend)")
    p.add_argument("--threads", type=int, default=2, help="torch/onnxruntime threads per inference (default 2)")
    p.add_argument("--compile", action="store_true", help="torch backend: compile the model with torch.compile "
                   "at start-up (tens of seconds), then score faster; images are scored one per call")
    p.add_argument("--max-bytes", type=_byte_size, default="20M", help="largest request body (default 20M)")
    p.add_argument("--max-pixels", type=int, default=20_000_000, help="largest image, width x height "
                   "(default 20000000)")
    p.add_argument("--max-files", type=int, default=16, help="most images per request (default 16)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504 (default 30)")
    p.add_argument("--concurrency", type=int, default=1, help="requests scored at the same time (default 1)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait beyond those; more get 503 "
                   "at once (default 16)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser calls from this "
                   "origin, e.g. https://line.example.com (repeatable; default: CORS off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

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
    args, extra = ap.parse_known_args(argv)
    if extra:  # `predict MODEL DIR --backend onnx DIR2`: inputs after an option are inputs too
        if getattr(args, "cmd", None) == "predict" and not any(e.startswith("-") for e in extra):
            args.inputs += extra
        else:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
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
