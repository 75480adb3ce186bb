"""Learning-rate schedules across rounds: values per round, the config record, and a resume."""

from __future__ import annotations

import math

import pytest

from fl import constants as K
from fl.app.config import compose
from fl.schedule import round_lr
from strategies.fedit import FedIT


def test_constant_is_the_peak_every_round() -> None:
    assert [round_lr(r, peak=1e-3, total_rounds=5) for r in range(1, 6)] == [1e-3] * 5


def test_cosine_values_per_round() -> None:
    got = [round_lr(r, peak=1.0, total_rounds=5, schedule="cosine") for r in range(1, 6)]
    want = [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]  # 1, .905, .655, .345, .095
    assert got == pytest.approx(want)
    assert got[0] == 1.0 and got[-1] > 0  # the last round still trains


def test_warmup_then_cosine_to_the_floor() -> None:
    lrs = [round_lr(r, peak=1.0, total_rounds=6, schedule="cosine", warmup_rounds=2, lr_min=0.1) for r in range(1, 7)]
    assert lrs[:2] == pytest.approx([0.1 + 0.9 / 3, 0.1 + 0.9 * 2 / 3])  # linear warm-up from the floor
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and min(lrs) >= 0.1
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_unknown_schedule_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"train\.lr_schedule"):
        compose(["model=tiny", "train.lr_schedule=linear"])
    with pytest.raises(ValueError, match=r"train\.lr_min"):
        compose(["model=tiny", "train.lr_min=1"])


def _strategy(overrides: list[str]) -> FedIT:
    cfg = compose(overrides)
    return FedIT.from_config(cfg, overrides=overrides, fixed={})


def test_server_sends_the_rounds_rate_and_a_resume_keeps_the_schedule() -> None:
    ov = ["model=tiny", "sim.rounds=6", "train.lr_schedule=cosine", "train.warmup_rounds=1", "strategy.lr=2e-3"]
    whole = _strategy(ov)
    # Flower counts each session's rounds from 1; round_offset makes them absolute (fl/app/server_app.py)
    uninterrupted = [float(whole.config_record(r, K.PHASE_TRAIN)[K.LR]) for r in range(1, 7)]
    resumed = _strategy(ov)
    resumed.round_offset = 3  # a run resumed after round 3
    after_resume = [float(resumed.config_record(r + resumed.round_offset, K.PHASE_TRAIN)[K.LR]) for r in range(1, 4)]
    assert after_resume == uninterrupted[3:]
    assert uninterrupted == [
        round_lr(r, peak=2e-3, total_rounds=6, schedule="cosine", warmup_rounds=1) for r in range(1, 7)
    ]
    assert K.LR not in whole.config_record(1, "evaluate")


def test_centralised_reference_follows_the_federations_schedule(tiny: list[str]) -> None:
    from simulations.centralised import run

    ov = [*tiny, "sim.rounds=2", "train.lr_schedule=cosine", "strategy.lr=4e-3"]
    history = run(ov, steps=4, eval_every=1)
    lrs = [h["lr"] for h in history[1:]]  # step s trains at round 1 + floor(s * 2 / 4)'s rate
    r1, r2 = (round_lr(r, peak=4e-3, total_rounds=2, schedule="cosine") for r in (1, 2))
    assert lrs == pytest.approx([r1, r1, r2, r2]) and r2 < r1
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert all(0.0 <= h["accuracy"] <= 1.0 and math.isfinite(h["loss"]) for h in history)


def test_centralised_reference_scores_the_validation_split_choices_read(tiny: list[str]) -> None:
    from fl.app.workspace import get_workspace
    from simulations.centralised import run

    ov = [*tiny, "sim.rounds=1", "data.val_size=24"]
    history = run(ov, steps=1, eval_every=1)
    val = get_workspace(ov).task.val
    assert val is not None and len(val) == 24
    assert all({"val_loss", "val_accuracy"} <= h.keys() for h in history)
    assert all(0.0 <= h["val_accuracy"] <= 1.0 and math.isfinite(h["val_loss"]) for h in history)
    assert history[0]["val_loss"] != history[0]["loss"]  # another split than the test split
    assert "val_accuracy" not in run([*tiny, "sim.rounds=1", "data.val_size=0"], steps=1, eval_every=1)[0]
