"""Bounded loopback load (or soak) against `anomap serve`: errors, latency, throughput, server memory.

Starts `anomap serve MODEL` on a free loopback port (or uses --url with --pid of a running server), warms it
up, then sends a fixed number of POST /v1/predict requests from N concurrent clients, optionally at a fixed
rate and for at most a given time. Reports status counts, p50/p90/p99 latency, requests/s, and the server
process's resident memory (VmRSS from /proc/PID/status) after warm-up, at its peak and at the end.

    python benchmarks/serve_load.py --model runs/demo/model.safetensors --requests 500 --concurrency 8
    python benchmarks/serve_load.py --model runs/demo/model.safetensors --rate 20 --duration 600 \\
        --requests 100000 --concurrency 8          # a 10-minute soak at 20 requests/s

For a soak, the server's RSS after ``--rss-skip`` seconds is fitted with a straight line (the last sample
of every minute, least squares) and the slope is reported in MiB per hour with its 95% interval.

Only loopback addresses are accepted as targets. Nothing is written unless --json is given.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_slope(trace: list[tuple[float, float]], skip_s: float) -> dict[str, float | int] | None:
    """Least-squares slope of the last RSS sample of every minute after ``skip_s``, in MiB per hour, with
    its 95% t-interval; None with fewer than 5 minutes."""
    from scipy import stats

    last = {int(t // 60): (t, m) for t, m in trace if t >= skip_s}
    if len(last) < 5:
        return None
    t, m = np.array([v[0] for v in last.values()]) / 3600.0, np.array([v[1] for v in last.values()])
    fit = stats.linregress(t, m)
    half = float(stats.t.ppf(0.975, len(t) - 2) * fit.stderr)
    return {"slope": round(float(fit.slope), 2), "low": round(float(fit.slope) - half, 2),
            "high": round(float(fit.slope) + half, 2), "points": len(t)}


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"serve_load: refusing target {url!r}: only loopback addresses (127.0.0.0/8, ::1, "
                         "localhost) may be loaded")
    return url.rstrip("/")


def test_image(path: str | None, size: int) -> tuple[str, bytes]:
    if path:
        return Path(path).name, Path(path).read_bytes()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    arr = np.clip(base[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "load.png", buf.getvalue()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "anomap.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--threads", str(args.threads), "--concurrency", str(args.server_concurrency),
           "--queue", str(args.queue)]
    if args.backend:
        cmd += ["--backend", args.backend]
    cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("serve_load: the server did not answer /healthz within 120 s")


class Load:
    """Sends requests from worker threads; each request is scheduled (fixed rate) or sent back to back."""

    def __init__(self, url: str, image: tuple[str, bytes], args: argparse.Namespace):
        self.url, self.image, self.args = url + "/v1/predict" + ("?heatmap=true" if args.heatmap else ""), image, args
        self.lock = threading.Lock()
        self.next = 0
        self.latencies: list[float] = []
        self.status: Counter = Counter()
        self.t0 = 0.0

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= self.args.requests or time.perf_counter() - self.t0 > self.args.duration:
                return None
            self.next += 1
            return self.next - 1

    def worker(self) -> None:
        headers = {"X-API-Key": os.environ["ANOMAP_API_KEY"]} if os.environ.get("ANOMAP_API_KEY") else {}
        with httpx.Client(timeout=self.args.timeout, headers=headers) as client:
            while (i := self._take()) is not None:
                if self.args.rate:
                    delay = self.t0 + i / self.args.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                t = time.perf_counter()
                try:
                    r = client.post(self.url, files=[("file", (self.image[0], self.image[1], "image/png"))])
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                dt = time.perf_counter() - t
                with self.lock:
                    self.status[key] += 1
                    self.latencies.append(dt)

    def run(self) -> float:
        self.t0 = time.perf_counter()
        threads = [threading.Thread(target=self.worker) for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - self.t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model file: start `anomap serve MODEL` on a free loopback port")
    src.add_argument("--url", help="an already running server on this machine (loopback only)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    ap.add_argument("--backend", choices=["auto", "torch", "onnx"], help="server --backend (default: the server's)")
    ap.add_argument("--max-batch", type=int, default=8, help="server --max-batch (default 8)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms (default 5)")
    ap.add_argument("--rss-skip", type=float, default=120.0, help="seconds of the measured load left out of the "
                    "RSS slope fit (default 120)")
    ap.add_argument("--threads", type=int, default=2, help="server inference threads (default 2)")
    ap.add_argument("--server-concurrency", type=int, default=1, help="server --concurrency (default 1)")
    ap.add_argument("--queue", type=int, default=16, help="server --queue (default 16)")
    ap.add_argument("--requests", type=int, default=500, help="requests to send after warm-up (default 500)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--rate", type=float, default=0.0, help="requests per second (0 = as fast as answered)")
    ap.add_argument("--duration", type=float, default=900.0, help="stop after this many seconds (default 900)")
    ap.add_argument("--warmup", type=int, default=20, help="requests before measuring (default 20)")
    ap.add_argument("--image", help="image file to send (default: a generated 256x256 PNG)")
    ap.add_argument("--size", type=int, default=256, help="side of the generated image (default 256)")
    ap.add_argument("--heatmap", action="store_true", help="ask for the heat-map overlay too")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request in seconds")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0:
        ap.error("--requests, --concurrency and --duration must be positive")

    proc = None
    if args.model:
        proc, url = start_server(args)
        pid = proc.pid
    else:
        url, pid = loopback_only(args.url), args.pid
    try:
        health = httpx.get(url + "/healthz", timeout=10).json()
        image = test_image(args.image, args.size)
        warm = Load(url, image, argparse.Namespace(**{**vars(args), "requests": args.warmup, "rate": 0.0}))
        warm.run()
        rss = {"after_warmup": rss_mib(pid) if pid else None}
        samples: list[float] = []
        trace: list[tuple[float, float]] = []  # (seconds since the measured load started, RSS MiB)
        stop = threading.Event()
        t_start = time.perf_counter()

        def sample() -> None:
            while not stop.wait(1.0):
                if pid and (m := rss_mib(pid)) is not None:
                    samples.append(m)
                    trace.append((time.perf_counter() - t_start, m))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(url, image, args)
        wall = load.run()
        stop.set()
        sampler.join(5)
        rss["end"] = rss_mib(pid) if pid else None
        rss["peak"] = max(samples + [v for v in rss.values() if v is not None], default=None)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    lat = np.asarray(load.latencies) * 1000.0
    n = len(lat)
    ok = load.status.get("200", 0)
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                                                       f"{os.cpu_count()} CPUs", "python": platform.python_version(),
        "requests": n, "ok": ok, "errors": n - ok, "status": dict(load.status), "concurrency": args.concurrency,
        "rate": args.rate or None, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 2) if wall else None,
        "latency_ms": {q: round(float(np.percentile(lat, p)), 2) if n else None
                       for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "image_bytes": len(image[1]), "heatmap": args.heatmap, "backend": health.get("backend"),
        "batching": health.get("batching"),
        "server_rss_mib": {k: round(v, 1) if v is not None else None for k, v in rss.items()},
        # the last RSS sample of every minute of the measured load: a leak keeps rising, warm-up levels off
        "rss_by_minute_mib": [round(m, 1) for _, m in
                              {int(t // 60): (t, m) for t, m in trace}.values()],
    }
    result["rss_slope_mib_per_hour"] = rss_slope(trace, args.rss_skip)
    r = result["server_rss_mib"]
    growth = None if r["end"] is None or r["after_warmup"] is None else round(r["end"] - r["after_warmup"], 1)
    result["server_rss_mib"]["growth_after_warmup"] = growth
    print(f"{n} requests, {args.concurrency} concurrent{f' at {args.rate:g}/s' if args.rate else ''}: "
          f"{ok} ok, {n - ok} errors {dict(load.status)}")
    lm = result["latency_ms"]
    print(f"latency ms: p50 {lm['p50']}  p90 {lm['p90']}  p99 {lm['p99']}  max {lm['max']};  "
          f"{result['requests_per_s']} requests/s over {result['wall_s']} s")
    print(f"server RSS MiB: after warm-up {r['after_warmup']}, peak {r['peak']}, end {r['end']} "
          f"(growth {growth})")
    if result["rss_by_minute_mib"]:
        print("server RSS MiB at the end of each minute: " + " ".join(map(str, result["rss_by_minute_mib"])))
    if (slope := result["rss_slope_mib_per_hour"]) is not None:
        print(f"server RSS slope after {args.rss_skip:g} s: {slope['slope']} MiB/h, 95% interval "
              f"[{slope['low']}, {slope['high']}] over {slope['points']} minutes")
    print(f"served by: {result['backend']}, batching {result['batching']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if n and ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
