"""The console: the progress display in terminal (rich, redrawn in place) and plain (non-TTY) mode, and a
tiny fl-sim whose output holds our lines but no Flower/Ray banner, no deprecation warning, no repeated warning."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from fl.app.progress import RunProgress, clock, summary_line

ROW = {
    "round": 1,
    "accuracy": 0.6512,
    "loss": 0.8123,
    "bytes_up": 2_000_000,
    "bytes_down": 1_000_000,
    "residual": 3.2e-8,
    "epsilon_max": 2.5,
    "wall_seconds": 75.0,
    "eval_examples": 500,
}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _round(p: RunProgress) -> None:
    p.round_started(1, 2)
    p.reply(steps=5)
    p.reply(steps=5)
    p.round_done(ROW)
    p.close()


def test_summary_line_has_every_figure() -> None:
    line = summary_line(ROW, rounds=3)
    for part in (
        "round 1/3",
        "accuracy 65.12%",
        "loss 0.8123",
        "500 held out",
        "up 2.00 MB",
        "down 1.00 MB",
        "ε 2.5",
        "residual 3.2e-08",
        "wall 1:15",
    ):
        assert part in line, (part, line)
    assert clock(3725) == "1:02:05"


def test_plain_mode_prints_lines_not_redraws() -> None:
    out = io.StringIO()  # not a terminal
    p = RunProgress(rounds=3, steps_per_client=5, stream=out, plain_interval=3600)
    assert not p.live
    _round(p)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()  # no cursor control codes in a log
    assert lines[0].startswith("round 1/3 · clients 0/2 · steps 0/10")
    assert lines[1].startswith("round 1/3 · clients 2/2 · steps 10/10")  # a finished round always prints
    assert "ETA" in lines[1] and "ETA ?" not in lines[1]
    assert lines[2].startswith("round 1/3 · accuracy 65.12%")
    assert len(lines) == 3  # the reply in between was throttled by plain_interval


def test_terminal_mode_redraws_one_live_line() -> None:
    out = _Tty()
    p = RunProgress(rounds=3, steps_per_client=5, stream=out)
    assert p.live
    p.round_started(1, 2)
    p.reply(steps=5)
    assert p.line().startswith("round 1/3 · clients 1/2 · steps 5/10")
    p.reply(steps=5)
    p.round_done(ROW)
    p.close()
    text = out.getvalue()
    assert "\x1b[" in text  # rich moved the cursor: the live line is redrawn in place, then cleared
    assert "round 1/3 · accuracy 65.12%" in text  # the summary stays above it


def test_eta_counts_the_rounds_left() -> None:
    p = RunProgress(rounds=4, stream=io.StringIO())
    assert p.eta() is None
    p.round_started(1, 2)
    p.t_train = p.t_train - 10.0  # type: ignore[operator]  # 10 s into round 1
    p.reply()
    eta = p.eta()
    assert eta is not None
    assert 65 <= eta <= 75  # 10 s per reply, 1 left in round 1 + 3 rounds x 2 = 7 replies


def test_default_run_console_is_quiet(tiny_overrides: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [
        sys.executable,
        "-m",
        "fl.app.cli",
        *tiny_overrides,
        "sim.num_clients=2",
        "sim.rounds=2",
        "data.partitioner=iid",
        "train.precision=bf16",
        "sim.round_eval_size=50",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for hidden in ("deprecated", "DEPRECATED", "FutureWarning", "Starting Flower", "Started a local Ray", "INFO :"):
        assert hidden not in out, (hidden, out[-3000:])
    assert "round 2/2 · accuracy" in out and "(on 100 held out)" in out  # the last round scores the whole split
    assert "round 1/2 · accuracy" in out and "(on 50 held out)" in out
    # our warnings once per run: bf16 on a CPU without it warns in the server only, not once per actor
    from fl.accel import cpu_bf16_native

    assert out.count("training in fp32") == (0 if cpu_bf16_native() else 1), out[-3000:]
