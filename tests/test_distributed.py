"""Multi-process training (train/distributed.py): sharding, and 2 gloo processes started by torchrun.

The 2-process checks run once per session (fixture ``two_procs``): torchrun starts this file as a
script (``__main__`` below) on 2 CPU processes with 1 thread each, on a free port (``--standalone``).

Tolerance of the equivalence test: the 2-process run is the same computation as one process with
the same global batch, but float32 sums in another order (each rank sums its half of the batch, DDP
averages the halves, BatchNorm statistics are reduced across ranks) differ in the last bits, and
Adam turns such differences into large ones where a gradient is near zero (the update is
lr * g / (|g| + eps), so its sign follows the noise): in float32 the weights after 4 steps differ by
up to ~4 lr. The test therefore runs both in float64, where the same effect stays below 1e-12, and
requires max |w_2proc - w_1proc| <= 1e-9.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import anomap.data.tensors
from anomap.data.tensors import to_tensor
from anomap.errors import ConfigError
from anomap.train.distributed import DistContext, env_context, shard, shard_batch, sync_batchnorm
from anomap.train.loop import batch_indices

ROOT = Path(__file__).resolve().parents[1]
FIT_ARGS = ["--method", "ssl_ae", "-q", "--device", "cpu", "--set", "image_size=32", "--set", "width=8",
            "--set", "batch_size=4", "--set", "max_steps=4", "--set", "checkpoint_every=2",
            "--set", "num_threads=1", "--set", "min_heldout=3"]
TOL_FLOAT64 = 1e-9


# --- sharding (no processes needed) ------------------------------------------------------------------


def rank_batch_indices(n: int, batch_size: int, seed: int, stage_index: int, step: int,
                       ctx: DistContext) -> np.ndarray:
    """The image indices this rank trains on at ``step``: its slice of the global ``batch_indices``.

    What the loop gives a rank: it builds the global batch from ``batch_indices`` and keeps the
    rank's rows (``shard_batch``).
    """
    return batch_indices(n, batch_size, seed, stage_index, step)[shard(batch_size, ctx)]


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 2), (17, 8, 4), (64, 6, 3), (5, 6, 2), (33, 4, 1)])
def test_ranks_share_each_epoch_without_repeats(n, batch, world):
    per_epoch = max(1, n // batch)
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        parts = {r: [rank_batch_indices(n, batch, 7, 1, s, DistContext(r, world)) for s in steps]
                 for r in range(world)}
        for r in range(world):  # equal contiguous shards of the one-process global batch
            for s, got in zip(steps, parts[r], strict=True):
                assert len(got) == batch // world
                np.testing.assert_array_equal(got, batch_indices(n, batch, 7, 1, s)[r * len(got):(r + 1) * len(got)])
        seen = np.concatenate([i for r in range(world) for i in parts[r]])
        if n >= batch:  # no image twice in an epoch across ranks; all but the n % batch drop_last ones
            assert len(set(seen.tolist())) == len(seen) == per_epoch * batch
        else:  # fewer images than one batch: each image once, the rest drawn with replacement
            assert set(seen.tolist()) == set(range(n))


def test_global_batch_must_split_evenly():
    assert shard(8, DistContext(1, 4)) == slice(2, 4)
    with pytest.raises(ConfigError, match="batch size 6 cannot be split over 4 processes.*divisible"):
        shard(6, DistContext(0, 4))


def test_a_rank_trains_its_slice_of_the_global_batch():
    """The loop makes the global batch and keeps the rank's rows: those are rank_batch_indices' images."""
    images = np.random.default_rng(0).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    idx = batch_indices(11, 4, 0, 0, 3)
    full = {"image": to_tensor(images[idx], "cpu"), "scale": torch.ones(1), "tag": "x"}
    for r in range(2):
        ctx = DistContext(r, 2)
        part = shard_batch(full, 4, ctx)
        assert torch.equal(part["image"], to_tensor(images[rank_batch_indices(11, 4, 0, 0, 3, ctx)], "cpu"))
        assert part["scale"] is full["scale"] and part["tag"] == "x"


def test_environment_is_read_like_torchrun_sets_it(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert env_context() == DistContext() and not env_context().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert env_context() == DistContext(3, 4, 1, 2) and not env_context().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4 does not fit WORLD_SIZE=4"):
        env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        env_context()


def test_batchnorm_swap_is_undone_and_plain_without_a_group():
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(2))
    x = torch.randn(4, 3, 5, 5)
    want = bn[0](x)
    with sync_batchnorm(bn, DistContext(0, 2)) as changed:
        assert changed == 2 and type(bn[0]).__name__ == "GlobalBatchNorm2d"
        assert torch.equal(bn[0](x), torch.nn.BatchNorm2d.forward(bn[0], x))  # no process group: the plain layer
    assert type(bn[0]) is torch.nn.BatchNorm2d and type(bn[1]) is torch.nn.BatchNorm1d
    assert bn[0](x).shape == want.shape


def test_python_dash_m_anomap_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "anomap", "methods"], check=False, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ssl_ae" in out.stdout


# --- 2 processes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def float64_training():
    """Train in float64: images become float64 tensors and new modules float64 (see the module docstring).

    ``to_tensor`` is replaced in every anomap module that imported it.
    """
    original, dtype = anomap.data.tensors.to_tensor, torch.get_default_dtype()
    users = [m for name, m in list(sys.modules.items())
             if name.startswith("anomap.") and getattr(m, "to_tensor", None) is original]
    torch.set_default_dtype(torch.float64)
    for m in users:
        m.to_tensor = lambda images, device: original(images, device).double()
    try:
        yield
    finally:
        for m in users:
            m.to_tensor = original
        torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    from conftest import make_category

    work = tmp_path_factory.mktemp("ddp")
    data = make_category(work / "cat", n_train=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANOMAP_STREAM_MIN_BYTES": "0", "ANOMAP_DIST_TIMEOUT_S": "240",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__)), str(data), str(work)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return data, work, proc.stdout, results


def test_two_processes_train_the_weights_of_one(two_procs, tmp_path):
    from safetensors.torch import load_file

    from anomap.cli import main

    data, work, stdout, _ = two_procs
    with float64_training():
        assert main(["fit", "--data", str(data), "--out", str(tmp_path / "one.safetensors"), *FIT_ARGS]) == 0
    one, two = load_file(tmp_path / "one.safetensors"), load_file(work / "fit" / "two.safetensors")
    assert one.keys() == two.keys()
    diff = max(float((one[k].double() - two[k].double()).abs().max()) for k in one)
    assert diff <= TOL_FLOAT64, diff
    # rank 0 alone reported and wrote: the model only (no .partial checkpoint, no image cache left)
    assert [line for line in stdout.splitlines() if line.startswith("trained")] == [
        next(line for line in stdout.splitlines() if "by 2 processes" in line)]
    assert [p.name for p in (work / "fit").iterdir()] == ["two.safetensors"]


def test_two_process_resume_is_exact_and_ranks_agree(two_procs):
    _, _, _, results = two_procs
    for r, res in enumerate(results):
        assert res["rank"] == r
        assert res["odd_batch_error"].startswith("batch size 3 cannot be split over 2 processes")
        assert res["resumed_equals_uninterrupted"], res
        assert res["crash_checkpoint"] == ["dec", 4]
    assert results[0]["fingerprints"] == results[1]["fingerprints"]  # identical weights on both ranks
    assert set(results[0]["fingerprints"]) == {"tiny", "isstad", "gtrans"}


# --- the worker torchrun starts -------------------------------------------------------------------------


def _fingerprint(module: torch.nn.Module) -> list[float]:
    return [float(v.double().sum()) for v in module.state_dict().values()]


def _worker(data: Path, work: Path) -> None:  # pragma: no cover - runs in the torchrun processes
    from anomap.cli import main
    from anomap.config import build_config
    from anomap.methods.gtrans import GTrans, GTransConfig
    from anomap.methods.isstad import Isstad
    from anomap.methods.isstad.config import IsstadConfig
    from anomap.train.checkpoint import read_metadata
    from anomap.train.distributed import session
    from anomap.train.loop import train
    from anomap.train.schedule import Stage, cosine_factor
    from test_train import TinyAE, make_images

    class EvenTinyAE(TinyAE):
        """TinyAE (dropout: the per-rank torch RNG matters) with batch sizes 2 processes can split."""

        def stages(self, n_fit: int) -> list[Stage]:
            return [Stage("ae", 9, 4, lambda: torch.optim.Adam(self.parameters(), lr=1e-2), cosine_factor(9, 2)),
                    Stage("dec", 7, 2, lambda: torch.optim.AdamW(self.dec.parameters(), lr=5e-3), lambda s: 1.0)]

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with session("cpu") as (ctx, _):
        res: dict = {"rank": ctx.rank, "fingerprints": {}}
        with float64_training():  # the CLI in the running process group (Detector.fit joins it)
            assert main(["fit", "--data", str(data), "--out", str(work / "fit" / "two.safetensors"), *FIT_ARGS]) == 0

        try:
            train(TinyAE(), make_images(), seed=1, device=cpu, progress=False, dist=ctx)
        except ConfigError as e:
            res["odd_batch_error"] = e.problem
        ckpt = work / "resume" / "t.safetensors"
        torch.manual_seed(0)
        ref = EvenTinyAE()
        train(ref, make_images(), seed=1, device=cpu, progress=False, dist=ctx)
        torch.manual_seed(0)
        crashed = EvenTinyAE()
        crashed.crash_at = ("dec", 5)
        with contextlib.suppress(RuntimeError):
            train(crashed, make_images(), seed=1, device=cpu, progress=False, dist=ctx, ckpt_path=ckpt,
                  checkpoint_every=2)
        res["crash_checkpoint"] = [read_metadata(ckpt)["stage"], read_metadata(ckpt)["step"]]
        torch.manual_seed(99)
        resumed = EvenTinyAE()
        train(resumed, make_images(), seed=1, device=cpu, progress=False, dist=ctx, ckpt_path=ckpt, resume=True,
              checkpoint_every=2)
        res["resumed_equals_uninterrupted"] = all(
            torch.equal(a, b)
            for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True))
        res["fingerprints"]["tiny"] = _fingerprint(ref)

        images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
        torch.manual_seed(0)
        isstad = Isstad(build_config(IsstadConfig, {
            "image_size": 32, "patch_size": 8, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16,
            "dec_heads": 2, "dec_depth_stage1": 1, "dec_depth_stage2": 2, "stage1_batch_size": 4,
            "stage2_batch_size": 4, "max_steps": 4}), 3)
        train(isstad, images, seed=0, device=cpu, progress=False, dist=ctx)  # two stages, frozen encoder
        res["fingerprints"]["isstad"] = _fingerprint(isstad)
        torch.manual_seed(0)
        gtrans = GTrans(build_config(GTransConfig, {"image_size": 32, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2,
                                                    "batch_size": 4, "max_steps": 2}), 3)
        gtrans.prepare_fit(images)
        train(gtrans, images, seed=0, device=cpu, progress=False, dist=ctx)  # frozen teacher, BN student
        res["fingerprints"]["gtrans"] = _fingerprint(gtrans)
        (work / f"rank{ctx.rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
