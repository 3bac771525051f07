"""The argument parser of the ``anomap`` command line (:mod:`anomap.cli`)."""

from __future__ import annotations

import argparse

from anomap.cli.commands import (
    cmd_bench,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_fit,
    cmd_methods,
    cmd_predict,
    cmd_report,
    cmd_serve,
    cmd_update,
)
from anomap.registry import DEFAULT_METHOD

EPILOG = "Config: --config FILE.yaml and/or --set key=value (repeatable, strict: unknown keys are errors)."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config values (flat, or nested under the method name)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override config values, e.g. --set max_steps=500 teacher.arch=efficientnet_lite1 "
                        "(repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anomap", description="Unsupervised visual anomaly detection: "
                                 "train on good images, score and localise defects.", epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("methods", help="list the available methods")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each method's default config")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("fit", help="train a detector on normal images", epilog=EPILOG)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"method name (see `anomap methods`; default {DEFAULT_METHOD})")
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
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("-q", "--quiet", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="prediction service (REST API + web page) for one model",
                       description="anomap serve MODEL: POST /v1/predict, GET /v1/model, GET /healthz, GET /metrics "
                       "(Prometheus), POST /v1/feedback, POST /v1/reload (or SIGHUP: load MODEL again), docs at "
                       "/docs, web page at /. Set ANOMAP_API_KEY to require the X-API-Key header on /v1/*.")
    p.add_argument("model", help="trained .safetensors file or exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto", help="runtime (default auto: "
                   "the fastest the model has; a .safetensors model on the CPU is exported to ONNX at start-up, "
                   "parity checked, and served by onnxruntime when it is installed; else PyTorch)")
    p.add_argument("--device", help="cpu, cuda or auto (torch backend)")
    p.add_argument("--threads", type=int, default=2, help="torch/onnxruntime threads per inference (default 2)")
    p.add_argument("--compile", action="store_true", help="torch backend: compile the model with torch.compile "
                   "at start-up (tens of seconds), then score faster; images are scored one per call")
    p.add_argument("--max-bytes", type=_byte_size, default="20M", help="largest request body (default 20M)")
    p.add_argument("--max-pixels", type=int, default=20_000_000, help="largest image, width x height "
                   "(default 20000000)")
    p.add_argument("--max-files", type=int, default=16, help="most images per request (default 16)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504 (default 30)")
    p.add_argument("--concurrency", type=int, default=1, help="batches scored at the same time (default 1)")
    p.add_argument("--max-batch", type=int, default=8, help="dynamic batching: a batch closes at this many images "
                   "(default 8; 1 = every request alone)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="... or this long after its oldest request "
                   "arrived (default 5)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait beyond concurrency x max-batch; "
                   "more get 503 at once (default 16)")
    p.add_argument("--feedback-dir", metavar="DIR", help="store operators' verdicts from POST /v1/feedback and "
                   "the page's buttons here (default: feedback off); fold them in with `anomap update`")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser calls from this "
                   "origin, e.g. https://line.example.com (repeatable; default: CORS off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("update", help="fold operator feedback (confirmed false alarms) into a model, no retraining",
                       description="anomap update MODEL --feedback DIR --out NEW: the feedback's normal records go "
                       "into the memory of a method that has one (then it is recalibrated on its held-out normals); "
                       "a method without one is recalibrated on its held-out normals plus them. Prints what changed "
                       "on the held-out normals, the feedback normals and the confirmed defects (docs/deploy.md).")
    p.add_argument("model", help="the .safetensors model to update (an .onnx export: update its source, export again)")
    p.add_argument("--feedback", required=True, action="extend", nargs="+", metavar="DIR",
                   help="feedback folder(s) written by `anomap serve --feedback-dir` (repeatable)")
    p.add_argument("--out", required=True, help="the updated model (may be MODEL itself: written atomically)")
    p.add_argument("--data", help="the training folder, for the held-out normals (default: the one recorded in "
                   "the model)")
    p.add_argument("--json", help="also write the report (with every record's scores) to this JSON file")
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("bench", help="train + evaluate method x dataset pairs; Markdown rows, suite means with "
                       "bootstrap intervals; --compare two benches",
                       description="anomap bench --data D1 D2 ... --method M1 M2 ...: one row per pair and each "
                       "method's mean over the datasets with 95% bootstrap intervals. anomap bench --compare RUNS_A "
                       "RUNS_B: B - A per dataset and for the suite mean, paired 95% intervals and the adoption "
                       "verdict per metric (docs/protocol.md). anomap bench --suite RUNS: the suite block of the "
                       "runs already in RUNS.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="category folders to bench")
    what.add_argument("--compare", nargs=2, metavar=("RUNS_A", "RUNS_B"),
                      help="compare two bench runs folders (each runs/<tag>/<dataset>-<method>/...): B - A")
    what.add_argument("--suite", metavar="RUNS", help="the suite block of the runs in a runs folder")
    p.add_argument("--method", nargs="+", help=f"methods to bench (default {DEFAULT_METHOD}); with --compare: the "
                   "method of both folders, or one for A and one for B")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="config overrides for every run")
    p.add_argument("--out", default="runs/bench/benchmarks.md",
                   help="Markdown file the rows (or the comparison) are appended to, created if missing "
                        "(default: runs/bench/benchmarks.md)")
    p.add_argument("--runs-dir", default="runs/bench", help="where models, metrics and reports go")
    p.add_argument("--max-minutes", type=float, help="training time budget per run")
    p.add_argument("--label", default="", help="note for the table's notes column")
    p.add_argument("--json", help="--compare: JSON file of the comparison (default: beside --out, named after "
                   "both folders)")
    p.set_defaults(func=cmd_bench)
    return ap
