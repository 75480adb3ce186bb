"""`fl-sim` on Flower's supported path (a local SuperLink in simulation mode + `flwr run`): a Ray cluster the
user brings, Ctrl-C, and the progress relay between `flwr-simulation` and the user's console."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from loop_grid import LoopGrid

from fl.app.processes import free_port
from fl.app.relay import ProgressFile, ProgressReader
from fl.app.server_app import run_server
from fl.app.simulation import SIM_DIR, run_simulation, server_error, superlink_cause
from fl.outputs import read_metrics

SIM = ["sim.num_clients=3", "sim.rounds=2", "train.local_steps=2", "data.partitioner=iid"]
RAY = str(Path(sys.executable).parent / "ray")


def _stop_tree(roots: list[psutil.Process], timeout: float = 30.0) -> None:
    """SIGTERM `roots` (each a `ray start --block`), then SIGKILL whatever of their trees is left, by PID."""
    tree = []
    for r in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [r, *r.children(recursive=True)]
    for r in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            r.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head and a worker node started with `ray start --block` on loopback (2 CPUs); its address."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    head_args = ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]
    head = subprocess.Popen(
        [RAY, "start", *head_args, "--include-dashboard=false", *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    roots = [psutil.Process(head.pid)]
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_nodes(address, 1, env)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", *common],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        roots.insert(0, psutil.Process(worker.pid))
        _wait_for_nodes(address, 2, env)
        yield address
    finally:
        _stop_tree(roots)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    res = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return 0
    active = res.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in res.stdout else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


def _wait_for_nodes(address: str, n: int, env: dict[str, str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive_nodes(address, env) < n:
        assert time.monotonic() < deadline, f"the Ray cluster at {address} has fewer than {n} nodes"
        time.sleep(1.0)


def test_a_simulation_on_an_existing_ray_cluster_ends_where_the_local_one_does(
    ray_cluster: str, tiny: list[str], tmp_path: Path
) -> None:
    """`sim.ray_address`: flwr-simulation joins the cluster (two nodes on this machine), the metrics are the
    local run's (the in-process grid reproduces the Simulation Runtime exactly: test_reliability), and the
    cluster is still up when the job has ended."""
    common = [*tiny, *SIM]
    on_cluster = run_simulation([*common, f"sim.ray_address={ray_cluster}", f"run_dir={tmp_path / 'cluster'}"])
    local = run_server(LoopGrid(3), [*common, f"run_dir={tmp_path / 'local'}"])
    a, b = read_metrics(local), read_metrics(on_cluster)
    assert [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-9)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra.get("bytes_up") == rb.get("bytes_up") and ra.get("residual") == pytest.approx(rb.get("residual"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    assert _alive_nodes(ray_cluster, env) == 2  # the user's cluster outlives the job


def _terminal_sigint() -> None:
    """In the child: SIGINT as a terminal's foreground job has it. A shell's background job (`cmd &`, as CI may
    start the suite) inherits SIGINT ignored, and Python keeps it ignored, as POSIX intends for such jobs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_stops_every_process_and_says_how_to_resume(
    sig: signal.Signals, code: int, word: str, tiny: list[str], tmp_path: Path
) -> None:
    """SIGINT (a terminal's Ctrl-C) or SIGTERM (a scheduler's stop: SLURM, Kubernetes, systemd) to fl-sim
    mid-run: exit 130 or 143, a resume hint, and every process it started (SuperLink, SuperExec,
    flwr-simulation, Ray, actors) gone."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl.app.cli", *tiny, *SIM, "sim.rounds=20", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_terminal_sigint,
    )
    deadline = time.monotonic() + 240
    seen: set[psutil.Process] = set()
    try:
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "fl-sim ended before round 0"
            seen.update(psutil.Process(proc.pid).children(recursive=True))
            time.sleep(0.2)
        seen.update(psutil.Process(proc.pid).children(recursive=True))
        assert any("flwr-simulation" in " ".join(p.cmdline()) for p in seen if p.is_running())
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _stop_tree([psutil.Process(proc.pid)])
    assert proc.returncode == code, out[-2000:]
    assert f"fl-sim: {word}; every process it started is stopped. Continue with: fl-sim resume={run_dir}" in out
    _, alive = psutil.wait_procs(list(seen), timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:2] for p in alive]
    assert not (run_dir / "summary.json").exists()


def test_the_relay_replays_the_servers_events_into_the_users_console(tmp_path: Path) -> None:
    """What the ServerApp tells its ProgressFile comes out of the reader's RunProgress: the plain lines, the
    summary line and our loggers' records; a half-written line waits for the next poll."""
    import logging

    path = tmp_path / "progress.jsonl"
    sink = ProgressFile(path, rounds=2, steps_per_client=3, start_round=0)
    out = io.StringIO()
    reader = ProgressReader(path, stream=out)
    sink.round_started(1, 2)
    sink.reply(3)
    logging.getLogger("strategies.base").info("round 1: sending to 2 clients")
    reader.poll()
    assert reader.progress is not None and reader.progress.done == 1 and reader.progress.steps == 3
    assert "round 1/2 · clients 0/2 · steps 0/6" in out.getvalue()
    with path.open("a") as f:
        f.write('{"event": "reply", "st')  # torn: not replayed until complete
    reader.poll()
    assert reader.progress.done == 1
    with path.open("a") as f:
        f.write('eps": 3}\n')
    row = {"round": 1, "accuracy": 0.5, "loss": 1.0, "wall_seconds": 3.0}
    sink.round_done(row)
    sink.close()
    reader.poll()
    assert reader.progress.done == 2 and reader.closed
    assert "round 1/2 · accuracy 50.00% · loss 1.0000" in out.getvalue()
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()][-1] == "close"


def test_a_failed_serverapp_is_named_by_its_exception(tiny: list[str], tmp_path: Path) -> None:
    """The server's own checks run before any process starts; a ServerApp that fails later is reported by
    its exception line from the run's log (Flower repeats it under its own tracebacks)."""
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"data\.test_size=0"):
        run_simulation([*tiny, *SIM, "data.test_size=0", f"run_dir={tmp_path / 'r'}"])
    assert time.monotonic() - t0 < 60 and not (tmp_path / "r" / SIM_DIR).exists()
    log = (
        'Traceback (most recent call last):\n  File "fl/app/server_app.py", line 52, in run_server\n'
        "KeyError: 'strategy.nosuch'\n12/02/2026 ERROR:Simulation raised an exception\n"
        "RuntimeError: Exception in ServerApp thread\n"
    )
    assert server_error(log) == "KeyError: 'strategy.nosuch'"
    assert server_error("no traceback here") is None


def test_a_serverapp_dropped_by_the_superlink_names_why() -> None:
    """A ServerApp paused past Flower's heartbeat timeout raises nothing; the SuperLink's log (copied from a run
    paused 30 min with SIGSTOP, 2026-12-06) says it refused the task's token from then on."""
    log = (
        "ERROR :     [/v1/runtime/send-task-heartbeat][ApiError:1008] Runtime task-token authentication failed.\n"
        '2026-12-06T23:45:10.428Z INFO [uvicorn.access] 127.0.0.1:59496 - "POST /v1/runtime/send-task-heartbeat" 401\n'
    )
    cause = superlink_cause(log)
    assert cause is not None and "heartbeat" in cause and "token expired" in cause
    assert superlink_cause("INFO :      SuperExec terminated gracefully.") is None
