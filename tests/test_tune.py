"""Choosing on validation: the best round is the validation split's pick, and a tiny Optuna study (Hydra's Optuna
sweeper through `fl-sim -m +tune=…`, its trials inline) optimises the final validation accuracy and writes its best
parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from fl import constants as K
from fl.outputs import best_round, late_swing, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def test_the_best_round_is_the_validation_splits_pick_not_the_tests() -> None:
    history = [
        {"round": 0, "accuracy": 0.40, K.VAL_ACCURACY: 0.41},
        {"round": 1, "accuracy": 0.70, K.VAL_ACCURACY: 0.50},  # best on test, not on validation
        {"round": 2, "accuracy": 0.60, K.VAL_ACCURACY: 0.55},
        {"round": 3, "accuracy": 0.58, K.VAL_ACCURACY: 0.55},  # a tie: the later round
    ]
    assert best_round(history) == {"best_round": 3, "best_round_accuracy": 0.58, "best_round_val_accuracy": 0.55}
    no_val = [{"round": 0, "accuracy": 0.4}, {"round": 1, "accuracy": 0.9}]
    assert best_round(no_val) == {"best_round": None, "best_round_accuracy": None, "best_round_val_accuracy": None}


def test_the_late_swing_is_the_largest_step_between_the_last_rounds() -> None:
    rounds = [0.444, 0.474, 0.552, 0.462, 0.562, 0.592]  # SmolLM2 FedAvgM seed 0 (BENCHMARKS.md): 10.0 points
    history = [{"round": i, "accuracy": a} for i, a in enumerate(rounds)]
    assert late_swing(history) == pytest.approx(0.100)
    assert late_swing(history, last=5) == pytest.approx(0.100)  # 55.2 -> 46.2 is 9.0, less
    assert late_swing(history, last=2) == pytest.approx(0.030)
    assert late_swing([{"round": 0, "accuracy": 0.3}, {"round": 1, "accuracy": 0.6}]) is None  # round 0 is no round
    assert late_swing([{"round": 0, "accuracy": 0.3}]) is None
    with pytest.raises(ValueError, match="last=1"):
        late_swing(history, last=1)


def test_a_tiny_optuna_study_maximises_the_final_validation_accuracy(cache_dir: str, tmp_path: Path) -> None:
    sweep = tmp_path / "tune"
    overrides = [*TINY, f"cache_dir={cache_dir}", "sim.num_clients=2", "sim.rounds=1", "sim.runtime=inline"]
    # three trials (each an inline fl-sim run: the sweeper is under test, not Ray): the must-show's tiny study; the
    # best is the max of their validation finals
    cmd = [sys.executable, "-m", "fl.app.cli", "-m", "+tune=ffa_lora", "hydra.sweeper.n_trials=3"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "0"}
    done = subprocess.run(
        [*cmd, *overrides, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the search space of configs/tune/ffa_lora.yaml less train.local_steps, which TINY fixes on the command line
    assert set(result["best_params"]) == {"strategy.lr", "server_opt.lr", "server_opt.momentum", "drift.mu"}
    finals = {}
    for trial in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        rows = read_metrics(trial)
        finals[trial.name] = rows[-1][K.VAL_ACCURACY]
        assert rows[-1]["round"] == 1
    assert len(finals) == 3
    assert result["best_value"] == pytest.approx(max(finals.values()))  # the objective is validation accuracy
