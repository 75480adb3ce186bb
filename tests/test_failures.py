"""A failed run names its cause, a killed run leaves no process behind, checkpoints cannot hurt or confuse.

Two tests run a real `fl-sim` on Flower's Simulation Runtime (~15-25 s each): one whose ServerApp raises in
its aggregation (`faulty_server.py`), one killed with SIGKILL; the rest are checkpoint files and one `fl-sim`
that stops before any process starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from loop_grid import LoopGrid

from fl.app.cli import resume_overrides
from fl.app.console import ERROR_LOG, failure_line
from fl.app.server_app import run_server
from fl.app.simulation import SIM_DIR
from fl.checkpoint import CHECKPOINT_FILE, FORMAT, PREVIOUS_FILE, Checkpoint, CheckpointError
from fl.outputs import read_metrics

TESTS = Path(__file__).resolve().parent
SIM = ["sim.num_clients=3", "train.local_steps=2", "data.partitioner=iid"]
FAULTY_SERVER = (
    "import fl.app.simulation as s; s.SERVER_APP = 'faulty_server:app'; from fl.app.cli import sim_main; sim_main()"
)


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_a_server_exception_is_one_line_with_its_traceback_in_the_run_folder(tiny: list[str], tmp_path: Path) -> None:
    """`fl-sim` whose ServerApp raises in round 2's aggregation (a real `flwr run`): one console line naming
    the exception, its message and where; the traceback in the run folder's error.log; round 1's checkpoint
    kept, and `resume=` finishes the run once the fault is gone."""
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-c", FAULTY_SERVER, *tiny, *SIM, "sim.rounds=2", f"hydra.run.dir={run_dir}"],
        env=_env(FEDLORA_SERVER_FAULT="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in res.stderr.splitlines() if line.startswith("fl-sim: error:")]
    assert res.returncode == 1 and len(errors) == 1, res.stderr[-3000:]
    line = errors[0]
    assert "ValueError: injected aggregation failure (faulty_server.py:" in line, line
    assert "in aggregate_train, round 2 aggregation)" in line and f"{run_dir / ERROR_LOG}" in line, line
    assert f"fl-sim resume={run_dir}" in line and "Traceback" not in res.stderr + res.stdout
    log = (run_dir / ERROR_LOG).read_text()
    assert log.startswith("ValueError: injected aggregation failure") and "Traceback (most recent call last)" in log
    assert 'faulty_server.py", line' in log and "strategy.py" in log  # through Flower's round loop
    assert Checkpoint.load(run_dir).round == 1 and not (run_dir / "summary.json").exists()
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]

    resumed = run_server(LoopGrid(3), resume_overrides(str(run_dir), []))  # "after a fix": the real aggregation
    assert [r["round"] for r in read_metrics(resumed)] == [0, 1, 2] and (resumed / "summary.json").is_file()


def _of_run(flwr_home: Path) -> list[psutil.Process]:
    """Every process whose environment names this run's FLWR_HOME: the SuperLink, SuperExec, flwr-simulation,
    `flwr log`, and Ray's daemons and workers (they inherit the SuperLink's environment)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(p)
    return found


def test_sigkill_of_fl_sims_process_group_leaves_no_flower_or_ray_process(tiny: list[str], tmp_path: Path) -> None:
    """`kill -9` of fl-sim's process group mid-run (the SuperLink runs in a session of its own, so the group kill
    misses it): the kernel's parent-death signal stops the SuperLink, which takes its SuperExec,
    `flwr-simulation` and Ray with it. Leftovers, if any, are killed here by PID and fail the test."""
    run_dir = tmp_path / "run"
    flwr_home = run_dir / SIM_DIR / "flwr-home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl.app.cli", *tiny, *SIM, "sim.rounds=20", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    seen: set[psutil.Process] = set()
    left: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "fl-sim ended before round 0"
            time.sleep(0.2)
        seen.update(_of_run(flwr_home))
        names = " ".join(" ".join(p.cmdline()[:3]) for p in seen)
        assert "flower-superlink" in names and "flwr-simulation" in names, names
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t0 = time.monotonic()
        # Ray's agents fate-share with their raylet, but first publish its death to the GCS (ray._private.
        # process_watcher), which the SIGKILL took too; that call can wait on the GCS client's reconnect timeout
        # before the agent exits. Seen under load (2 xdist workers): a runtime-env agent alive 60 s after the SIGKILL.
        while time.monotonic() - t0 < 150:
            left = [p for p in seen | set(_of_run(flwr_home)) if _alive(p)]
            if not left:
                break
            time.sleep(0.25)
        print(f"every process of the run gone {time.monotonic() - t0:.1f} s after the SIGKILL")
    finally:
        for p in [*left, *(q for q in seen if _alive(q))]:
            with contextlib.suppress(psutil.Error):
                p.kill()  # by PID: only processes of this test's run
    assert not left, [(p.pid, p.cmdline()[:2]) for p in left if _alive(p)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _checkpoint(round_: int) -> Checkpoint:
    """A checkpoint with the kinds of state strategies keep: tensors, a numpy Generator's state, int keys."""
    rng = np.random.default_rng(round_)
    state = {
        "rng": rng.bit_generator.state,
        "fixed": {"m.lora_A": torch.randn(4, 8)},
        "accountants": {0: {"kind": "rdp", "sigmas": [1.1], "rates": [0.01], "steps": [3]}},
        "robust": {"defence": "norm_bound", "history": [np.float64(0.5)]},
        "opt": {"m": {"m.lora_B": np.zeros((8, 4), dtype=np.float32)}, "step": np.int64(round_)},
    }
    history = [{"round": r, "accuracy": 0.5, "defence_clipped": {1: 0.3}} for r in range(round_ + 1)]
    return Checkpoint(round_, {"m.lora_B": torch.randn(8, 4)}, state, history, ["strategy=fedit", "sim.rounds=3"])


def test_checkpoints_hold_plain_data_and_load_without_running_code(tmp_path: Path) -> None:
    ckpt = _checkpoint(1)
    ckpt.save(tmp_path)
    back = Checkpoint.load(tmp_path)
    assert back.round == 1 and torch.equal(back.arrays["m.lora_B"], ckpt.arrays["m.lora_B"])
    rng = np.random.default_rng()
    rng.bit_generator.state = back.strategy_state["rng"]
    assert rng.random() == np.random.default_rng(1).random()  # the sampler's generator continues exactly
    assert back.strategy_state["opt"]["step"] == 1 and isinstance(
        back.strategy_state["opt"]["m"]["m.lora_B"], torch.Tensor
    )
    assert back.history[1]["defence_clipped"] == {1: 0.3} and back.strategy_state["accountants"][0]["steps"] == [3]

    with pytest.raises(TypeError, match=r"checkpoint\['strategy_state'\]\['bad'\] is a pathlib"):
        Checkpoint(1, {}, {"bad": tmp_path}, [], []).save(tmp_path / "x")

    marker = tmp_path / "code-ran"

    class Payload:  # what a hostile checkpoint.pt would carry: unpickling it calls os.mkdir(marker)
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(marker),))

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"format": FORMAT, "round": 1, "arrays": {}, "x": Payload()}, hostile / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="holds Python objects that a safe load does not build"):
        Checkpoint.load(hostile)
    assert not marker.exists()

    old = tmp_path / "v1"  # a v1 checkpoint (the same fields) of plain data still loads; one with numpy objects
    old.mkdir()  # is refused like the hostile one, naming the older format
    v1 = {
        "format": "fedlora-checkpoint-v1",
        "round": 1,
        "arrays": {},
        "strategy_state": {"rng": rng.bit_generator.state},
    }
    torch.save({**v1, "history": [{"round": 1}], "overrides": []}, old / CHECKPOINT_FILE)
    assert Checkpoint.load(old).round == 1
    torch.save({**v1, "history": [{"round": 1, "loss": np.float64(1)}], "overrides": []}, old / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="an older checkpoint format"):
        Checkpoint.load(old)


CHILD_WRITE = """
import io, sys, time, torch
from fl.checkpoint import Checkpoint
Checkpoint(1, {{"a": torch.zeros(1000)}}, {{}}, [], []).save({run!r})
real = torch.save
def torn(obj, f):  # write half of the file, then hang: the SIGKILL lands mid-write
    buf = io.BytesIO(); real(obj, buf); f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    print("writing", flush=True); time.sleep(600)
torch.save = torn
Checkpoint(2, {{"a": torch.ones(1000)}}, {{}}, [], []).save({run!r})
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path: Path) -> None:
    """Write-then-rename: a process SIGKILLed while writing round 2's checkpoint leaves round 1's intact."""
    code = CHILD_WRITE.format(run=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait(timeout=10)
    assert list(tmp_path.glob(f".{CHECKPOINT_FILE}.tmp*")), "the kill did not land mid-write"
    assert Checkpoint.load(tmp_path).round == 1


def test_resume_from_a_truncated_checkpoint_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`fl-sim resume=` on a torn checkpoint.pt: one line naming the file and the way on (the previous
    checkpoint, kept by the last write), exit status 2, no traceback."""
    _checkpoint(1).save(tmp_path)
    _checkpoint(2).save(tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    res = subprocess.run(
        [sys.executable, "-m", "fl.app.cli", f"resume={tmp_path}"], capture_output=True, text=True, timeout=120
    )
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2 and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert out.startswith(f"fl-sim: error: resume='{tmp_path}': {path} is damaged: truncated or corrupt"), out
    assert f"{tmp_path / PREVIOUS_FILE} (round 1) is sound" in out, out
    (tmp_path / PREVIOUS_FILE).unlink()
    with pytest.raises(CheckpointError, match="No earlier checkpoint is kept"):
        Checkpoint.load(tmp_path)


def test_failure_line_names_the_innermost_frame_of_ours() -> None:
    def deep() -> None:
        np.stack([np.zeros(2), np.zeros(3)])  # raises inside numpy: the line names this file, not numpy's

    try:
        deep()
    except ValueError as e:
        line = failure_line(e)
    assert line.startswith("ValueError: all input arrays must have the same shape (test_failures.py:"), line
    assert line.endswith(" in deep)"), line
