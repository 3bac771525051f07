"""The shared training loop and its checkpoints, with a tiny two-stage conv autoencoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from anomap.config import MethodConfig
from anomap.data.tensors import to_tensor
from anomap.errors import AnomapError, CheckpointError, ConfigError
from anomap.methods.base import Method
from anomap.train.checkpoint import (
    FORMAT_VERSION,
    flatten_optimizer_state,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    unflatten_optimizer_state,
)
from anomap.train.loop import batch_indices, train
from anomap.train.runtime import resolve_device, set_threads
from anomap.train.schedule import Stage, cosine_factor

CPU = torch.device("cpu")


class TinyAE(Method):
    """Stage "ae" trains everything with Adam; stage "dec" trains the decoder with AdamW."""

    name = "tiny"

    def __init__(self, config: MethodConfig | None = None, channels: int = 3, steps: tuple[int, ...] = (9, 7)):
        super().__init__(config or MethodConfig(), channels)
        self.enc = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.2))
        self.dec = nn.ConvTranspose2d(4, channels, 4, stride=2, padding=1)
        self.steps = steps
        self.crash_at: tuple[str, int] | None = None
        self.nan_at: tuple[str, int] | None = None

    def stages(self, n_fit: int) -> list[Stage]:
        out = [
            Stage("ae", self.steps[0], 4, lambda: torch.optim.Adam(self.parameters(), lr=1e-2), cosine_factor(9, 2)),
        ]
        if len(self.steps) > 1:
            out.append(
                Stage("dec", self.steps[1], 3, lambda: torch.optim.AdamW(self.dec.parameters(), lr=5e-3), lambda s: 1.0)
            )
        return out

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.enc.requires_grad_(name == "ae")

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, torch.Tensor]:
        x = to_tensor(images, "cpu")
        noise = torch.from_numpy(rng.normal(0.0, 0.1, size=x.shape).astype(np.float32))
        return {"x": x, "noisy": x + noise}

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if self.crash_at == (self.stage, step):
            raise RuntimeError("simulated crash")
        loss = (self.dec(self.enc(batch["noisy"])) - batch["x"]).pow(2).mean()
        if self.nan_at == (self.stage, step):
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}


def make_images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def new_model(init_seed: int = 0, **kw) -> TinyAE:
    torch.manual_seed(init_seed)
    return TinyAE(**kw)


def run(model: TinyAE, **kw):
    kw.setdefault("seed", 1)
    return train(model, kw.pop("images", make_images()), device=CPU, progress=False, **kw)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- loop --------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_follows_the_schedule():
    a, b, c = new_model(), new_model(), new_model()
    ra = run(a, log_every=5)
    run(b)
    run(c, seed=2)
    assert_same_weights(a, b)
    assert not torch.equal(a.dec.weight, c.dec.weight)
    assert ra.steps == ra.planned == {"ae": 9, "dec": 7}
    assert ra.stopped_by == "schedule" and ra.best_step is None
    assert not a.training  # left in eval mode
    assert [h["step"] for h in ra.history if h["stage"] == "ae"] == [5, 9]
    assert all(math.isfinite(h["loss"]) and "mse" in h for h in ra.history)
    # the schedule's lr was applied: base lr times the factor of the last step (index 8)
    assert ra.history[0]["lr"] == pytest.approx(1e-2 * cosine_factor(9, 2)(4))
    assert ra.history[1]["lr"] == pytest.approx(1e-2 * cosine_factor(9, 2)(8))


@pytest.mark.parametrize(
    ("crash_at", "saved_at"),
    [(("ae", 7), ("ae", 6)), (("dec", 5), ("dec", 3)), (("dec", 0), ("ae", 9))],  # last: at a stage end
)
def test_resume_after_crash_gives_identical_weights(tmp_path: Path, crash_at, saved_at):
    ref = new_model()
    run(ref)

    ckpt = tmp_path / "run" / "train.safetensors"
    crashed = new_model()
    crashed.crash_at = crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, ckpt_path=ckpt, checkpoint_every=3, extra_meta={"method": "tiny"})
    meta = read_metadata(ckpt)
    assert meta["kind"] == "train_state" and meta["method"] == "tiny"
    assert (meta["stage"], meta["step"]) == saved_at

    resumed = new_model(init_seed=123)  # different init: everything must come from the checkpoint
    res = run(resumed, ckpt_path=ckpt, resume=True, checkpoint_every=3, extra_meta={"method": "tiny"})
    assert_same_weights(ref, resumed)
    assert res.steps == {"ae": 9, "dec": 7} and res.stopped_by == "schedule"
    assert list(tmp_path.joinpath("run").iterdir()) == [ckpt]  # no temp files left behind


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path):
    ref, model = new_model(), new_model()
    run(ref)
    ckpt = tmp_path / "absent.safetensors"
    res = run(model, ckpt_path=ckpt, resume=True)
    assert_same_weights(ref, model)
    assert res.steps == res.planned
    assert read_metadata(ckpt)["step"] == 7  # final checkpoint: end of the last stage


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path):
    ckpt = tmp_path / "t.safetensors"
    run(new_model(), ckpt_path=ckpt, extra_meta={"method": "tiny", "config": {"image_size": 16, "device": "cpu"}})
    with pytest.raises(CheckpointError, match="method 'tiny', not 'other'.*drop --resume"):
        run(new_model(), ckpt_path=ckpt, resume=True, extra_meta={"method": "other"})
    with pytest.raises(CheckpointError, match=r"different config \(image_size\)"):
        run(new_model(), ckpt_path=ckpt, resume=True, extra_meta={"config": {"image_size": 32}})
    # a runtime-only key such as the device may change
    res = run(new_model(), ckpt_path=ckpt, resume=True, extra_meta={"config": {"image_size": 16, "device": "x"}})
    assert res.steps == res.planned


def test_resume_compares_the_config_stored_in_the_checkpoint_as_it_is(tmp_path: Path):
    """A config key the checkpoint lacks (added to the config since) counts as changed: no migration."""
    ckpt = tmp_path / "t.safetensors"
    run(new_model(), ckpt_path=ckpt, extra_meta={"method": "tiny", "config": {"image_size": 16}})
    with pytest.raises(CheckpointError, match=r"different config \(width\)\. Fix: delete the checkpoint"):
        run(new_model(), ckpt_path=ckpt, resume=True, extra_meta={"method": "tiny", "config": {"image_size": 16,
                                                                                                "width": 8}})
    with pytest.raises(CheckpointError, match=r"different config \(image_size\).*--set image_size=16"):
        run(new_model(), ckpt_path=ckpt, resume=True, extra_meta={"method": "tiny", "config": {"image_size": 32}})


def test_time_budget_stops_early_and_resume_continues(tmp_path: Path):
    ckpt = tmp_path / "t.safetensors"
    model = new_model(steps=(400,))
    res = run(model, ckpt_path=ckpt, max_seconds=1e-9)
    assert res.stopped_by == "time_budget"
    assert res.steps == {"ae": 1}  # at least one step, then the budget is over
    meta = read_metadata(ckpt)
    assert meta["step"] == 1 and meta["elapsed"] > 0
    # a resumed run counts the time already spent: the budget is still exhausted
    res2 = run(new_model(steps=(400,)), ckpt_path=ckpt, resume=True, max_seconds=1e-9)
    assert res2.stopped_by == "time_budget" and res2.steps == {"ae": 1}
    res3 = run(new_model(steps=(400,)), ckpt_path=ckpt, resume=True, max_seconds=0.0, log_every=100)
    assert res3.stopped_by == "schedule" and res3.steps == {"ae": 400}


def test_max_steps_from_config_caps_total_steps():
    model = new_model(config=MethodConfig(max_steps=11))
    res = run(model)
    assert res.stopped_by == "max_steps"
    assert res.steps == {"ae": 9, "dec": 2}


def test_eval_fn_keeps_the_best_weights():
    model = new_model()
    values = iter([5.0, 3.0, 1.0, 4.0])
    snapshots: dict[int, torch.Tensor] = {}

    def eval_fn() -> float:
        assert not model.training and not torch.is_grad_enabled()
        snapshots[len(snapshots)] = model.dec.weight.detach().clone()
        return next(values)

    res = run(model, eval_fn=eval_fn, eval_every=2)
    assert len(snapshots) == 4  # steps 2, 4, 6 and the stage end (7) of the last stage
    assert res.best_step == 6
    assert torch.equal(model.dec.weight, snapshots[2])
    assert not torch.equal(model.dec.weight, snapshots[3])


def test_nan_loss_raises_and_keeps_last_checkpoint(tmp_path: Path):
    ckpt = tmp_path / "t.safetensors"
    model = new_model()
    model.nan_at = ("ae", 5)
    with pytest.raises(AnomapError, match="training diverged: loss is nan at stage ae step 5") as info:
        run(model, ckpt_path=ckpt, checkpoint_every=2)
    assert info.value.fix == "lower lr or check the images"
    assert read_metadata(ckpt)["step"] == 4


def test_batch_indices_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(10, 3, 0, 0, s) for s in range(3)])
    assert len(seen) == 9 and len(set(seen.tolist())) == 9  # drop_last: one image left out per epoch
    assert np.array_equal(batch_indices(10, 3, 0, 0, 4), batch_indices(10, 3, 0, 0, 4))
    small = batch_indices(2, 5, 0, 0, 0)
    assert len(small) == 5 and set(small.tolist()) == {0, 1}


def test_threads_and_devices():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= set_threads(0) <= 16
    finally:
        torch.set_num_threads(before)
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="install a CUDA build of torch"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError):
        resolve_device("banana")


# --- checkpoint files ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_shared_and_strided_tensors(tmp_path: Path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "b": base, "t": base.t(), "r": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "sub" / "c.safetensors", tensors, {"x": [1, 2], "n": np.int64(3)})
    loaded, meta = load_checkpoint(path)
    assert meta == {"x": [1, 2], "n": 3} and read_metadata(path) == meta
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path: Path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"v": 1})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("anomap.train.checkpoint.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"v": 2})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    assert read_metadata(path) == {"v": 1}


def test_load_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(info.value)

    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.randn(64, 64)}, {"v": 1})
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint " * 10)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for bad in (cut, garbage, empty):
        with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file"):
            load_checkpoint(bad)
        with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file"):
            read_metadata(bad)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="a safetensors file, but not an anomap checkpoint"):
        load_checkpoint(foreign)

    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"anomap": json.dumps({}), "format_version": "99"})
    with pytest.raises(CheckpointError, match="written by a newer anomap; upgrade"):
        load_checkpoint(newer)
    assert FORMAT_VERSION < 99


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_state_round_trip_continues_identically(tmp_path: Path, opt_cls):
    torch.manual_seed(0)
    a = nn.Linear(5, 3)
    b = nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt_a = opt_cls(a.parameters(), lr=1e-2, **kw)
    data = [torch.randn(4, 5) for _ in range(6)]
    for x in data[:3]:
        a(x).pow(2).sum().backward()
        opt_a.step()
        opt_a.zero_grad()

    tensors, structure = flatten_optimizer_state(opt_a.state_dict())
    assert all(k.startswith("optim.") for k in tensors)
    path = save_checkpoint(tmp_path / "o.safetensors", tensors, {"opt": structure})
    loaded, meta = load_checkpoint(path)
    b.load_state_dict(a.state_dict())
    opt_b = opt_cls(b.parameters(), lr=1.0, **kw)  # wrong lr: the state must restore it
    opt_b.load_state_dict(unflatten_optimizer_state(loaded, meta["opt"]))
    assert opt_b.param_groups[0]["lr"] == 1e-2
    for x in data[3:]:
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert_same_weights(a, b)
