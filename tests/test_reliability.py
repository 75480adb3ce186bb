"""Reliability: failing and misbehaving clients, and a run resumed from its checkpoint.

Faulty clients run on the Simulation Runtime (Ray turns a client's exception into an error reply), and so does
the run whose whole process tree is killed; the resume comparisons themselves run in-process (`LoopGrid`: the
real ServerApp and ClientApp, a fresh federation per run, which is what a resume meets), ~1.5 s a run instead of
~30 s of Ray start-up. That in-process runs end exactly where Simulation-Runtime runs end is asserted in
`test_server_killed_mid_run_resumes_to_the_uninterrupted_result`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid
from safetensors.torch import load_file

from fl.app.cli import resume_overrides
from fl.app.server_app import run_server
from fl.app.simulation import run_simulation
from fl.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError
from fl.outputs import read_metrics

NODES = 3
SIM = [f"sim.num_clients={NODES}", "sim.min_train_clients=2", "data.partitioner=iid"]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def set_faults(spec: str) -> None:
        monkeypatch.setenv("FEDLORA_FAULTS", spec)

    return set_faults


def test_failing_and_bad_clients_do_not_stop_the_run(tiny: list[str], tmp_path: Path, faults) -> None:  # type: ignore[no-untyped-def]

    # round 1: client 1 raises, client 2 sends NaN; round 2: client 0 sends a wrong shape, client 2 an extra key
    faults("1:1:raise,2:1:nan,0:2:shape,2:2:extra")
    run_dir = run_simulation([*tiny, *SIM, "sim.rounds=3", f"run_dir={tmp_path / 'r'}"], client_app="faulty_client:app")
    rows = {r["round"]: r for r in read_metrics(run_dir)}
    assert rows[1]["failed"] == 1 and rows[1]["rejected"] == 1 and rows[1]["replied"] == 2
    assert "injected client failure" in rows[1]["client_errors"]["1"]  # the exception's text, by partition
    assert "client_errors" not in rows[2] and "client_errors" not in rows[3]
    assert rows[2]["rejected"] == 2 and rows[2]["failed"] == 0
    # one usable reply each (< sim.min_train_clients=2): both rounds are skipped, nothing half-applied
    assert rows[1]["skipped"] and rows[2]["skipped"] and rows[1]["aggregated"] == rows[2]["aggregated"] == 0
    assert rows[3]["failed"] == 0 and rows[3]["rejected"] == 0 and rows[3]["aggregated"] == 3
    assert not rows[3]["skipped"]
    assert rows[1]["accuracy"] == rows[0]["accuracy"] and rows[2]["accuracy"] == rows[0]["accuracy"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_enough_good_replies_are_aggregated_without_the_bad_one(tiny: list[str], tmp_path: Path, faults) -> None:  # type: ignore[no-untyped-def]
    from faulty_client import app

    faults("1:1:nan")  # in-process: a NaN reply needs no Ray to be screened
    run_dir = run_server(LoopGrid(NODES, app=app), [*tiny, *SIM, "sim.rounds=1", f"run_dir={tmp_path / 'r'}"])
    row = read_metrics(run_dir)[1]
    assert row["rejected"] == 1 and row["aggregated"] == 2
    assert row["loss"] == row["loss"]  # the aggregate holds no NaN: the evaluation loss is a number
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_clients_exception_reaches_the_rounds_metrics_in_fed_sbs_init_and_in_training(
    tiny: list[str], tmp_path: Path, faults, one_thread
) -> None:  # type: ignore[no-untyped-def]
    """Inline (fl.app.inline): an exception becomes an error reply, as Flower's Simulation Runtime makes it (the
    Ray run of test_failing_and_bad_clients_do_not_stop_the_run reads the same reason)."""
    from faulty_client import app

    faults("1:0:raise,2:1:raise")  # round 0: Fed-SB's init exchange; round 1: training
    overrides = [*tiny, *SIM, "strategy=fed_sb", "strategy.rank=2", "sim.rounds=1", f"run_dir={tmp_path / 'r'}"]
    rows = read_metrics(run_server(LoopGrid(NODES, app=app), overrides))
    assert rows[0]["failed"] == 1 and "injected client failure" in rows[0]["client_errors"]["1"]
    assert rows[1]["failed"] == 1 and list(rows[1]["client_errors"]) == ["2"]
    assert "injected client failure" in rows[1]["client_errors"]["2"] and rows[1]["aggregated"] == 2


DP = ["privacy=dp", "privacy.target_epsilon=8", "privacy.planned_rounds=3"]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fedit", []),
        ("fed_sb", []),
        ("fedit", DP),
        ("ffa_lora", ["server_opt.average_from=1", "sim.client_sampling=cyclic"]),  # the mean and the cycle resume
    ],
)
def test_resume_ends_where_the_uninterrupted_run_ends(
    tiny: list[str], tmp_path: Path, strategy: str, extra: list[str]
) -> None:
    common = [*tiny, *SIM, f"strategy={strategy}", "strategy.rank=4", "sim.fraction_train=0.67", *extra]
    full = run_server(LoopGrid(NODES), [*common, "sim.rounds=3", f"run_dir={tmp_path / 'full'}"])
    # "killed" after round 1: a run whose last checkpoint is round 1, then resumed to round 3 by a new federation
    part = run_server(LoopGrid(NODES), [*common, "sim.rounds=1", f"run_dir={tmp_path / 'part'}"])
    assert Checkpoint.load(part).round == 1
    resumed = run_server(LoopGrid(NODES), resume_overrides(str(part), ["sim.rounds=3"]))
    assert resumed == part
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    # Fed-SB re-sends the frozen A and B after a resume (a new federation holds none): only bytes_down differ
    keys = ["accuracy", "loss", "bytes_up", "train_loss", "residual", "sampled", "epsilon_max"]
    if strategy != "fed_sb":
        keys.append("bytes_down")
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            va, vb = ra.get(key), rb.get(key)
            assert (va is None and vb is None) or va == pytest.approx(vb, rel=1e-6, abs=1e-9), (key, ra["round"])
    fa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys()
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)
    if extra == DP:  # the clients' accountants resumed too: ε kept composing from where it was
        assert b[-1]["epsilon_max"] > b[1]["epsilon_max"] > 0
    if strategy == "ffa_lora":  # the checkpointed mean resumed: round 3 scored the mean of rounds 1-3
        assert [r["averaged_rounds"] for r in b] == [0, 1, 2, 3] == [r["averaged_rounds"] for r in a]


def test_resume_from_a_folder_without_checkpoint_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resume="):
        Checkpoint.load(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_FILE} is damaged: truncated or corrupt"):
        Checkpoint.load(tmp_path)
    assert os.path.exists(tmp_path / CHECKPOINT_FILE)


def test_a_client_that_times_out_is_counted_and_the_round_goes_on(
    tiny: list[str], tmp_path: Path, faults, monkeypatch
) -> None:  # type: ignore[no-untyped-def]

    faults("2:1:sleep")
    monkeypatch.setenv("FEDLORA_FAULT_SLEEP", "25")
    # sim.cpus=2: two actors; the sleeper holds one into round 2 (with one actor, round 2 would queue behind it)
    overrides = [*tiny, *SIM, "sim.cpus=2", "sim.rounds=2", "sim.timeout=10", f"run_dir={tmp_path / 'r'}"]
    run_dir = run_simulation(overrides, client_app="faulty_client:app")
    rows = {r["round"]: r for r in read_metrics(run_dir)}
    assert rows[1]["failed"] == 1 and rows[1]["aggregated"] == 2 and not rows[1]["skipped"]
    assert rows[2]["aggregated"] >= 2


def test_server_killed_mid_run_resumes_to_the_uninterrupted_result(tiny: list[str], tmp_path: Path) -> None:
    """SIGKILL the whole fl-sim process tree (server, Ray, actors) after round 1's checkpoint, then resume.

    The killed run is a real `fl-sim` on the Simulation Runtime; the resumed and the uninterrupted runs go
    in-process, so this also pins that `LoopGrid` runs reproduce the Simulation Runtime's numbers exactly."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    import psutil

    common = [*tiny, *SIM, "sim.rounds=3", "train.local_steps=4"]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl.app.cli", *common, f"hydra.run.dir={killed_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    tree = [psutil.Process(proc.pid)]
    try:
        while time.monotonic() < deadline:
            ckpt = killed_dir / CHECKPOINT_FILE
            if ckpt.is_file() and Checkpoint.load(killed_dir).round >= 1:
                break
            assert proc.poll() is None, "fl-sim ended before it could be killed"
            time.sleep(0.2)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    finally:
        for p in reversed(tree):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)  # by PID: exactly the processes this test started
        proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    stopped_at = Checkpoint.load(killed_dir).round
    assert 1 <= stopped_at < 3 and not (killed_dir / "summary.json").exists()

    resumed = run_server(LoopGrid(NODES), resume_overrides(str(killed_dir), []))
    full = run_server(LoopGrid(NODES), [*common, f"run_dir={tmp_path / 'full'}"])
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-9)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    fa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)
