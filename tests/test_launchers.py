"""Sweep cells and tuning trials through Hydra's launchers (simulations/launch.py), on loopback only.

Every cell is a real tiny `fl-sim` run (on `sim.runtime=inline`, except on the Ray cluster, where each cell's
simulation joins the cluster). The sequential sweep's metrics (recorded in tests/golden_sweep.json) are
what each launcher must reproduce cell by cell; the joblib case is tests/test_sweep.py's own 4-cell sweep, which
runs on joblib, 2 cells at a time, and is checked against them there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import TINY

from fl import constants as K
from fl.app.processes import Processes, free_port
from fl.outputs import read_metrics
from simulations.launch import Launch
from simulations.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).with_name("golden_sweep.json")
COMPARED = ("round", "accuracy", "loss", K.VAL_ACCURACY, "train_loss", "residual")
joblib_plugin = pytest.importorskip(
    "hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed (the `launchers` extra)"
)


def grid(tiny: list[str]) -> list[str]:
    """The 4 cells of tests/test_sweep.py's sequential sweep (FedIT, FFA-LoRA × 2, 3 clients; one round)."""
    return [*tiny, "sim.rounds=1", "data.partitioner=iid", "strategy=fedit,ffa_lora", "sim.num_clients=2,3"]


def cell_metrics(sweep_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each finished cell's metrics.jsonl, keyed by strategy and clients (the cell ids hash the cache path)."""
    out = {}
    for cell in json.loads((sweep_dir / "sweep.json").read_text())["cells"].values():
        if cell["status"] != "done":
            continue
        given = dict(o.split("=", 1) for o in cell["overrides"])
        key = f"{given['strategy']}/{given['sim.num_clients']}"
        out[key] = [{k: r.get(k) for k in COMPARED} for r in read_metrics(Path(cell["dir"]))]
    return out


def assert_same_metrics(got: dict[str, list[dict[str, Any]]], want: dict[str, list[dict[str, Any]]]) -> None:
    """Cell by cell, round by round; to float32 rounding (the ServerApp's torch runs on fewer threads in a
    parallel cell, which may reorder a sum)."""
    for key, rows in got.items():
        assert len(rows) == len(want[key]), key
        for r, w in zip(rows, want[key], strict=True):
            assert {k for k, v in r.items() if v is None} == {k for k, v in w.items() if v is None}, key
            numbers = {k: v for k, v in w.items() if v is not None}
            assert {k: r[k] for k in numbers} == pytest.approx(numbers, rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def sequential() -> dict[str, list[dict[str, Any]]]:
    if not GOLDEN.is_file():
        pytest.skip("tests/golden_sweep.json is missing: FEDLORA_RECORD_GOLDEN=1 pytest tests/test_sweep.py")
    return dict(json.loads(GOLDEN.read_text()))


def test_submitit_local_runs_a_sweep_and_records_a_failing_cell(
    tiny: list[str], tmp_path: Path, sequential: dict[str, list[dict[str, Any]]]
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    base = [*tiny, "sim.rounds=1", "data.partitioner=iid", "sim.num_clients=2", "sim.runtime=inline"]
    cases = [["strategy=ffa_lora"], ["strategy=fedit", "model.tokenizer=/no/such/tokenizer"]]  # 2 cells, 1 fails
    record = run_sweep(base, tmp_path, cases=cases, launch=Launch("submitit_local", jobs=2, cpus=1))
    status = {" ".join(e["overrides"][-2:]): e["status"] for e in record["cells"].values()}
    assert sorted(status.values()) == ["done", "failed"], status
    failed = next(e for e in record["cells"].values() if e["status"] == "failed")
    assert "/no/such/tokenizer" in (Path(failed["dir"]) / "FAILED.txt").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"] == record["cells"]
    assert list((tmp_path / "launcher" / ".submitit").iterdir())  # Submitit's own job folders
    assert_same_metrics(cell_metrics(tmp_path), sequential)


def test_a_cell_killed_mid_run_resumes_on_the_next_call(tiny: list[str], tmp_path: Path) -> None:
    # inline (the launcher's kill and resume are under test, not Ray's), a round takes well under a second: 12 rounds
    # leave the kill below many rounds to land in (at 2 the cell once finished before the kill)
    overrides = [*tiny, "sim.rounds=12", "data.partitioner=iid", "strategy=fedit", "sim.num_clients=2"]
    overrides.append("sim.runtime=inline")
    cmd = [sys.executable, "-m", "simulations.sweep", *overrides, "--dir", str(tmp_path)]
    sweep = subprocess.Popen([*cmd, "--launcher", "joblib", "--jobs", "2"], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(tmp_path.glob("cells/*/checkpoint.pt")):  # a round is saved: kill the sweep in the next
        assert sweep.poll() is None and time.monotonic() < deadline, "no checkpoint before the sweep ended"
        time.sleep(0.5)
    tree = [psutil.Process(sweep.pid), *psutil.Process(sweep.pid).children(recursive=True)]
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    _, left = psutil.wait_procs(tree, timeout=60)  # the multirun, its worker and fl-sim
    for p in left:
        p.kill()
    assert not left, f"processes outlived the killed sweep: {[p.pid for p in left]}"
    cell = next(tmp_path.glob("cells/*"))
    assert not (cell / K.SUMMARY_FILE).is_file()
    record = run_sweep(overrides, tmp_path, launch=Launch("joblib", jobs=2))
    entry = record["cells"][cell.name]
    assert entry["status"] == "done" and entry["resumed"]
    assert json.loads((cell / K.SUMMARY_FILE).read_text())["resumed_from_round"] < 12  # the last one saved
    assert [r["round"] for r in read_metrics(cell)] == list(range(13))


@pytest.mark.heavy  # ~4 tiny runs; tests/test_tune.py runs the Optuna sweeper in CI, the joblib test above joblib
def test_an_optuna_study_runs_four_trials_two_at_a_time_on_joblib(cache_dir: str, tmp_path: Path) -> None:
    overrides = [*TINY, f"cache_dir={cache_dir}", "sim.num_clients=2", "sim.rounds=1", "sim.runtime=inline"]
    cmd = [sys.executable, "-m", "fl.app.cli", "-m", "+tune=ffa_lora", "hydra.sweeper.n_trials=4"]
    cmd += ["hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    done = subprocess.run(
        [*cmd, *overrides, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    finals = [read_metrics(t)[-1][K.VAL_ACCURACY] for t in tmp_path.iterdir() if t.is_dir() and t.name.isdigit()]
    assert len(finals) == 4
    assert result["best_value"] == pytest.approx(max(finals))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real Ray cluster on loopback: a head and one worker node of 1 CPU each, stopped by PID afterwards."""
    procs = Processes()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block", "--disable-usage-stats"]

    def node_ports() -> list[str]:
        names = ("node-manager", "object-manager", "metrics-export", "runtime-env-agent")
        names += ("dashboard-agent-listen", "dashboard-agent-grpc")
        return [f"--{n}-port={free_port()}" for n in names]

    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}"]
    head.append("--include-dashboard=false")
    procs.start([*head, *common, *node_ports()], env=env, log_path=temp / "head.log")
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_nodes(address, 1, env)
        procs.start([ray, "start", f"--address={address}", *common, *node_ports()], env=env, log_path=temp / "w.log")
        _wait_for_nodes(address, 2, env)
        yield address
    finally:
        procs.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, env: dict[str, str], timeout: float = 180) -> None:
    probe = f"import ray; ray.init(address='{address}', log_to_driver=False); print(len(ray.nodes()))"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {n} nodes in {timeout:.0f} s")


@pytest.mark.heavy  # a real 2-node Ray cluster + 4 cells: ~6 min on 2 loaded cores
def test_a_ray_cluster_runs_the_cells_each_simulation_joining_it(
    ray_cluster: str, tiny: list[str], tmp_path: Path, sequential: dict[str, list[dict[str, Any]]]
) -> None:
    with pytest.raises(ValueError, match="one at a time"):
        Launch("ray", jobs=2, ray_address=ray_cluster)
    record = run_sweep(grid(tiny), tmp_path, launch=Launch("ray", ray_address=ray_cluster))
    assert [e["status"] for e in record["cells"].values()] == ["done"] * 4, record
    for entry in record["cells"].values():  # no Ray of its own: the cell joined the cluster
        cfg = yaml.safe_load((Path(entry["dir"]) / K.CONFIG_FILE).read_text())
        assert cfg["sim"]["ray_address"] == ray_cluster
    assert_same_metrics(cell_metrics(tmp_path), sequential)
