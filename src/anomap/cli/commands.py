"""The commands of the ``anomap`` command line (:mod:`anomap.cli`), one ``cmd_*`` function each."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from anomap.errors import DataError
from anomap.registry import DEFAULT_METHOD


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

    names = anomap.list_methods()
    width = max(map(len, names))
    for name in names:
        cls = get_method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:{width}s} {doc}")
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

    from anomap.runtime.backend import load_backend
    from anomap.runtime.batch import RowWriter, collect_inputs, predict_stream

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
    from anomap.bench.runner import run_compare, run_suite
    from anomap.errors import ConfigError

    if args.compare:
        if args.method and len(args.method) > 2:
            raise ConfigError(f"--compare takes one or two methods, got {len(args.method)}.",
                              fix="--method M (both folders) or --method M_A M_B")
        methods = (None, None) if not args.method else (args.method[0], args.method[-1])
        return run_compare(Path(args.compare[0]), Path(args.compare[1]), out=Path(args.out),
                           json_out=Path(args.json) if args.json else None, methods=methods)
    if args.suite:
        return run_suite(Path(args.suite), out=Path(args.out))
    return run_bench(args.data, args.method or [DEFAULT_METHOD], sets=args.set or [], out=Path(args.out),
                     runs_dir=Path(args.runs_dir), max_minutes=args.max_minutes, label=args.label)


def cmd_update(args: argparse.Namespace) -> int:
    from anomap.update import format_report, update_model, write_json

    _need(args.model, "model file", "give the .safetensors model the feedback is about")
    _check_device(args)
    _writable(args.out, "output model file")
    _writable(args.json, "JSON report file")
    report = update_model(args.model, args.feedback, args.out, data=args.data, device=args.device,
                          progress=not args.quiet)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    print(f"saved {args.out} ({report['seconds']:.1f} s)" + (f"; report: {args.json}" if args.json else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from anomap.errors import ConfigError

    try:
        import uvicorn

        from anomap.serve.app import API_KEY_ENV, backend_label, create_app
        from anomap.serve.limits import Limits
    except ImportError as e:
        raise ConfigError(f"`anomap serve` needs the serve extra ({e.name} is not installed).",
                          fix="pip install 'anomap[serve]'") from None
    from anomap.runtime.backend import DEFAULT_BATCH, Backend
    from anomap.serve.fastest import open_fastest
    from anomap.train.runtime import set_threads

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port.", fix="give a port from 1 to 65535, e.g. 8000")
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_files=args.max_files,
                    timeout_s=args.timeout, concurrency=args.concurrency, queue=args.queue,
                    max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    set_threads(args.threads)
    if args.compile:
        print("anomap serve: compiling the model for batches of 1 (tens of seconds, once)...", file=sys.stderr)

    def loader() -> Backend:  # start-up, POST /v1/reload and SIGHUP open the model the same way
        return open_fastest(args.model, None if args.backend == "auto" else args.backend, device=args.device,
                            threads=args.threads, batch_size=1 if args.compile else DEFAULT_BATCH,
                            compile=args.compile)

    backend = loader()
    app = create_app(backend, limits=limits, cors_origins=args.cors_origin or (), feedback_dir=args.feedback_dir,
                     loader=loader, sighup=True)
    keyed = bool(os.environ.get(API_KEY_ENV))
    print(f"anomap serve: {backend.method} ({backend_label(backend)}) on http://{args.host}:{args.port}/ "
          f"(API docs /docs); API key {'required' if keyed else 'not required'}", file=sys.stderr)
    if not keyed and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"anomap serve: warning: listening on {args.host} without an API key; set {API_KEY_ENV} to "
              "require one", file=sys.stderr)
    # uvicorn's own connection cap is a backstop above the service's admission limit (503 either way)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                limit_concurrency=limits.concurrency + limits.queue + 64, timeout_keep_alive=5)
    return 0
