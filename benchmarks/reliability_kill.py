"""Kill -9 `anomap fit` at random steps, `--resume`, and compare with an uninterrupted run.

Each cycle starts `python -m anomap.cli fit` on a tiny generated dataset with ``checkpoint_every=1``,
sends SIGKILL once the ``.partial`` checkpoint has reached a random step (``--kills`` times per
cycle, resuming in between), then resumes to the end. The finished model must load (its content
hash is checked) and its weights and test scores must equal those of one uninterrupted run with the
same seed and one thread (bit for bit on CPU).

    nice -n 19 .venv/bin/python benchmarks/reliability_kill.py --cycles 20
    nice -n 19 .venv/bin/python benchmarks/reliability_kill.py --cycles 10 --kills 3 --method isstad

Prints a Markdown table and a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "ssl_ae": {"image_size": 32, "width": 8, "batch_size": 4},
    "isstad": {"image_size": 32, "patch_size": 8, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16,
               "dec_heads": 2, "dec_depth_stage1": 1, "dec_depth_stage2": 2, "stage1_batch_size": 4,
               "stage2_batch_size": 4},
    "gtrans": {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4},
}


def make_data(root: Path, size: int = 32) -> Path:
    """12 striped normal training images and 4 test images (2 with a bright square), MVTec layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def normal() -> np.ndarray:
        base = 120 + 60 * np.sin(xx / 5.0 + rng.uniform(0, 0.3)) * np.cos(yy / 7.0)
        return np.clip(base[..., None] + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)

    for i in range(12):
        Image.fromarray(normal()).save(root / "train/good" / f"{i:03d}.png")
    for i in range(2):
        Image.fromarray(normal()).save(root / "test/good" / f"{i:03d}.png")
        img, mask = normal(), np.zeros((size, size), np.uint8)
        img[8:16, 8:16] = mask[8:16, 8:16] = 255
        Image.fromarray(img).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def fit_cmd(method: str, sets: dict, data: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "anomap.cli", "fit", "--method", method, "--data", str(data), "--out", str(out), "-q"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd + (["--resume"] if resume else [])


def partial_step(partial: Path) -> int:
    """Total steps done according to the .partial checkpoint (-1 while there is none)."""
    from anomap.train.checkpoint import read_metadata

    try:
        return int(sum(read_metadata(partial).get("steps_done", {}).values()))
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return -1


def run_and_kill(cmd: list[str], partial: Path, at: int, env: dict) -> int | None:
    """Run ``cmd``; SIGKILL it once the checkpoint reaches ``at`` steps. The step seen, or None if it finished."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            step = partial_step(partial)
            if step >= at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
            time.sleep(0.005)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--kills", type=int, default=1, help="kills per cycle before the final resume")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--method", default="ssl_ae", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    args = ap.parse_args()

    import torch

    import anomap
    from anomap.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    sets = {**CONFIGS[args.method], "max_steps": args.steps, "checkpoint_every": 1, "device": "cpu",
            "min_heldout": 3, "num_threads": 1, "seed": 3}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pick = random.Random(args.seed)
    rows, ok = [], 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="anomap-kill-") as tmp:
        data = make_data(Path(tmp) / "data", size=sets["image_size"])
        ref_path = Path(tmp) / "ref.safetensors"
        anomap.create(args.method, **sets).fit(data, out=ref_path, progress=False)
        ref = anomap.load(ref_path)
        images = sorted((data / "test").rglob("*.png"))
        ref_scores = np.array([r.score for r in ref.predict(images)])
        ref_state = ref.model.state_dict()
        for c in range(args.cycles):
            out = Path(tmp) / f"c{c}" / "model.safetensors"
            partial = Path(str(out) + ".partial")
            targets = sorted(pick.sample(range(1, args.steps - 1), args.kills))
            seen: list[str] = []
            for k, at in enumerate(targets):
                step = run_and_kill(fit_cmd(args.method, sets, data, out, resume=k > 0), partial, at, env)
                seen.append("finished" if step is None else str(step))
                if partial.exists():
                    load_checkpoint(partial)  # whole and verified, whatever instant the kill hit
            done = subprocess.run(fit_cmd(args.method, sets, data, out, resume=True), env=env, check=False,
                                  capture_output=True, text=True)
            status, equal_w, equal_s = "failed", False, False
            if done.returncode == 0 and out.exists():
                det = anomap.load(out)
                state = det.model.state_dict()
                equal_w = state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
                equal_s = bool(np.array_equal([r.score for r in det.predict(images)], ref_scores))
                status = "ok"
            temps = len(list(out.parent.glob(".*.tmp")))
            ok += status == "ok" and equal_w and equal_s
            rows.append(f"| {c + 1} | {', '.join(map(str, targets))} | {', '.join(seen)} | {status} | "
                        f"{'yes' if equal_w else 'NO'} | {'yes' if equal_s else 'NO'} | {temps} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{args.method}, {args.steps} steps, checkpoint every step, {args.kills} kill(s) per cycle, "
          f"seed {args.seed}:\n")
    print("| cycle | kill at step(s) | checkpoint step when killed | resumed run | weights equal | "
          "scores equal | stray temp files |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{ok}/{args.cycles} cycles finished with bit-identical weights and scores "
          f"({time.perf_counter() - t0:.0f} s).")


if __name__ == "__main__":
    main()
