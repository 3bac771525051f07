"""The last stage is shortened once, with its learning-rate schedule compressed, when it would overrun the budget.

A fake clock stands in for a slow machine: every training step advances it by one second.
"""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import pytest

import anomap.train.schedule as schedule_mod
import anomap.train.state as state_mod
from anomap.train.checkpoint import read_metadata
from anomap.train.schedule import compressed, cosine_factor, probe_steps, shortened_total
from test_train import assert_same_weights, new_model, run


@pytest.fixture
def clock(monkeypatch):
    """A clock that only moves when a training step runs (1 s per step)."""
    c = types.SimpleNamespace(t=1000.0)
    fake = types.SimpleNamespace(monotonic=lambda: c.t)
    monkeypatch.setattr(state_mod, "time", fake)
    monkeypatch.setattr(schedule_mod, "time", fake)
    return c


def slow(model, clock):
    step_fn = model.training_step

    def step(batch, s):
        clock.t += 1.0
        return step_fn(batch, s)

    model.training_step = step
    return model


def test_shortened_total_and_probe_length():
    assert shortened_total(10, 200, steps_per_s=1.0, remaining_s=40.0) == 10 + int(0.95 * 40)
    assert shortened_total(10, 40, steps_per_s=1.0, remaining_s=40.0) is None  # 30 steps left fit in 38
    assert shortened_total(10, 200, steps_per_s=1.0, remaining_s=0.0) == 11  # at least one more step
    assert shortened_total(10, 200, steps_per_s=0.0, remaining_s=40.0) is None
    assert [probe_steps(n) for n in (10, 200, 10_000)] == [5, 10, 30]


def test_compressed_schedule_keeps_the_past_and_reaches_the_final_rate():
    f = cosine_factor(200, warmup=4, final=0.01)
    g = compressed(f, at=10, old_total=200, new_total=48)
    assert [g(s) for s in range(11)] == [f(s) for s in range(11)]
    assert g(48) == pytest.approx(f(200)) == pytest.approx(0.01)
    values = [g(s) for s in range(10, 49)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # still decaying, never jumping up


def test_a_slow_machine_gets_a_shorter_schedule_that_ends_inside_the_budget(clock):
    model = slow(new_model(steps=(200,)), clock)
    res = run(model, max_seconds=50.0, log_every=1)
    # timed over steps 2-12 (1 step/s) with 38 s left: 36 more steps instead of 188
    assert res.replanned == {"ae": {"at": 12, "from": 200, "to": 48}}
    assert res.steps == {"ae": 48} and res.stopped_by == "schedule" and res.seconds <= 50.0
    assert res.planned == {"ae": 200}


def test_only_the_last_stage_is_shortened_and_a_fitting_schedule_is_left_alone(clock):
    res = run(slow(new_model(steps=(20, 200)), clock), max_seconds=50.0)
    # stage "ae" took 20 s; "dec" is timed over its steps 2-12, with 18 s left: 17 more steps
    assert res.replanned == {"dec": {"at": 12, "from": 200, "to": 29}} and res.steps == {"ae": 20, "dec": 29}
    fits = run(slow(new_model(steps=(20, 20)), clock), max_seconds=100.0)
    assert fits.replanned == {} and fits.steps == {"ae": 20, "dec": 20}
    unlimited = run(slow(new_model(steps=(200,)), clock), max_seconds=0.0)
    assert unlimited.replanned == {} and unlimited.steps == {"ae": 200}


def test_the_slow_first_steps_are_not_timed(clock):
    model = slow(new_model(steps=(200,)), clock)
    step_fn = model.training_step

    def first_is_slow(batch, s):  # as on a GPU: the first step also selects kernels and grows the allocator
        clock.t += 20.0 if s == 0 else 0.0
        return step_fn(batch, s)

    model.training_step = first_is_slow
    res = run(model, max_seconds=100.0)
    # steps 0-1 took 22 s; timed over steps 2-12 at 1 step/s with 68 s left: 64 more steps. Timing from
    # step 0 would have measured 12 steps in 32 s and planned 24 more.
    assert res.replanned == {"ae": {"at": 12, "from": 200, "to": 76}} and res.steps == {"ae": 76}
    assert res.seconds <= 100.0


def test_resume_follows_the_shortened_schedule(clock, tmp_path: Path):
    ref = slow(new_model(steps=(200,)), clock)
    want = run(ref, max_seconds=50.0)

    ckpt = tmp_path / "t.safetensors"
    crashed = slow(new_model(steps=(200,)), clock)
    crashed.crash_at = ("ae", 30)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, ckpt_path=ckpt, checkpoint_every=5, max_seconds=50.0)
    meta = read_metadata(ckpt)
    assert meta["step"] == 30 and meta["replanned"] == {"ae": {"at": 12, "from": 200, "to": 48}}

    resumed = slow(new_model(init_seed=7, steps=(200,)), clock)
    got = run(resumed, ckpt_path=ckpt, resume=True, checkpoint_every=5, max_seconds=50.0)
    assert got.steps == want.steps == {"ae": 48} and got.replanned == want.replanned
    assert_same_weights(ref, resumed)
