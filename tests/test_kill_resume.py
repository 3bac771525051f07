"""kill -9 during `anomap fit`, then `--resume`: a valid model with the scores of an uninterrupted run.

On CPU with the same seed and thread count the resumed run is bit-identical: batch order is a pure
function of (seed, stage, step) and the checkpoint holds the weights, the optimiser state and both
RNG states (see train/loop.py), so the tolerance is zero.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import anomap
from anomap.train.checkpoint import load_checkpoint, read_metadata
from conftest import make_category

STEPS = 30
SETS = {"image_size": 32, "width": 8, "batch_size": 4, "max_steps": STEPS, "checkpoint_every": 1,
        "device": "cpu", "min_heldout": 3, "num_threads": 1, "seed": 3}


def _fit_cmd(data: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "anomap.cli", "fit", "--method", "ssl_ae", "--data", str(data),
           "--out", str(out), "-q"]
    for k, v in SETS.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd + (["--resume"] if resume else [])


def _partial_step(partial: Path) -> int:
    try:
        return int(read_metadata(partial)["step"])
    except Exception:  # noqa: BLE001 - not written yet (or being replaced): keep polling
        return -1


def kill_during_fit(data: Path, out: Path, kill_at: int, timeout: float = 60.0) -> int:
    """Start `anomap fit`, SIGKILL it once its .partial has reached step ``kill_at``; the step seen."""
    partial = Path(str(out) + ".partial")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_fit_cmd(data, out, resume=False), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            step = _partial_step(partial)
            if step >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
            time.sleep(0.005)
        raise AssertionError(f"fit ended (rc={proc.returncode}) before step {kill_at}: "
                             f"{proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, one_thread) -> None:
    data = make_category(tmp_path / "cat", n_train=10, n_good=2, n_defect=2, size=32)
    out = tmp_path / "model.safetensors"
    kill_at = random.Random(os.getpid()).randint(2, STEPS // 2)
    seen = kill_during_fit(data, out, kill_at)
    partial = Path(str(out) + ".partial")
    assert not out.exists() and kill_at <= seen < STEPS
    load_checkpoint(partial)  # whatever instant the kill hit, the checkpoint on disk is whole (hash checked)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_fit_cmd(data, out, resume=True), env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-1000:]
    assert out.exists() and not partial.exists()

    ref_path = tmp_path / "ref.safetensors"
    anomap.create("ssl_ae", **SETS).fit(data, out=ref_path, progress=False)
    resumed, ref = anomap.load(out), anomap.load(ref_path)
    assert resumed.info["steps"] == ref.info["steps"] == {"ssl_ae": STEPS}
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = sorted((data / "test").rglob("*.png"))
    ra, rb = resumed.predict(images), ref.predict(images)
    np.testing.assert_array_equal([r.score for r in ra], [r.score for r in rb])
    np.testing.assert_array_equal(ra[0].anomaly_map, rb[0].anomaly_map)
    assert resumed.calibration.threshold == ref.calibration.threshold
