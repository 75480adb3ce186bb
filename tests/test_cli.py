"""A user's mistake ends fl-sim / fl-sweep / fl-report with one line naming the field, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl.app.cli import DEBUG_ENV
from simulations import report, sweep


def _fl_sim(*args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (DEBUG_ENV, "HYDRA_FULL_ERROR")}
    if debug:
        env[DEBUG_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fl.app.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("strategy.rnak=3", "Key 'rnak' not in 'StrategyConfig'"),
        ("sim.rounds=0", "sim.rounds=0 is invalid: need at least one round."),
        ("strategy=nosuch", "Available options in 'strategy': fed_sb, fedex_lora, fedit"),
        ("strategy=lora_fair strategy.solver=nosuch", "strategy.solver='nosuch' is unknown; use one of sgd"),
    ],
)
def test_fl_sim_user_error_is_one_line(override: str, says: str, tmp_path: Path) -> None:
    proc = _fl_sim("model=tiny", *override.split(), f"run_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: ") and says in lines[0], proc.stderr
    assert DEBUG_ENV in lines[0] and "Traceback" not in proc.stderr


def test_fl_sim_debug_env_shows_the_traceback(tmp_path: Path) -> None:
    proc = _fl_sim("model=tiny", "sim.rounds=0", f"run_dir={tmp_path}", debug=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "sim.rounds=0" in proc.stderr


def test_fl_sweep_and_fl_report_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    for main, argv, says in [
        (sweep.main, ["sweep=nosuch"], "ready sweeps:"),
        (sweep.main, ["model=tiny", "sim.rounds=0,1", "--dir", str(tmp_path / "s")], "sim.rounds=0 is invalid"),
        (sweep.main, ["model=tiny", "train.lr_schedule=cos,cosine", "--dir", str(tmp_path / "s")], "train.lr_schedule"),
        (report.main, [str(tmp_path / "missing")], "No run folder"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and says in err[0], err


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ([], {"max_length": 40, "lora_layers": [3, 4, 5], "model": "minilm"}),  # the default job: quickstart
        (["strategy=fedit"], {"max_length": 40, "lora_layers": [3, 4, 5], "model": "minilm"}),
        (["+experiment=smollm2"], {"max_length": 128, "lora_layers": None, "model": "smollm2"}),  # names its own
        (["model=tiny", "sim.rounds=2"], {"max_length": 64, "lora_layers": None, "model": "tiny"}),  # another model
        (["data=hf", "data.path=x"], {"max_length": 64, "lora_layers": None, "model": "minilm"}),  # someone's data
    ],
)
def test_dev_sh_run_is_the_quickstart_job_unless_the_command_names_an_experiment_model_or_data(
    args: list[str], want: dict[str, object]
) -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["bash", str(root / "dev.sh"), "run", *args, "--cfg", "job"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    got = {"max_length": cfg["data"]["max_length"], "lora_layers": cfg["model"]["lora_layers"]}
    assert {**got, "model": cfg["model"]["name"]} == want
