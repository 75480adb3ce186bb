"""One simulation loads the base model once on the server's side: not in `fl-sim` (it checks the config and the
partitions from the data alone), once in the ServerApp's process (`flwr-simulation`: its workspace, also for the
export), and once in each client process (a Ray actor builds its own workspace)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fl.app import simulation
from fl.app.simulation import run_simulation
from fl.tasks import get_task, task_names

NUM_CLIENTS = 2


def test_a_simulation_loads_the_base_model_once_on_the_servers_side(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "loads.jsonl"
    log.touch()
    monkeypatch.setenv("FEDLORA_LOAD_LOG", str(log))
    monkeypatch.setattr(simulation, "SERVER_APP", "load_counter:server_app")
    fl_sim: list[int] = []  # builds in this process, where fl-sim runs

    def counting(build: Callable[..., Any]) -> Callable[..., Any]:
        def build_model(*args: Any, **kwargs: Any) -> Any:
            fl_sim.append(1)
            return build(*args, **kwargs)

        return build_model

    for name in task_names():
        task = get_task(name)
        monkeypatch.setattr(task, "build_model", counting(task.build_model))
    overrides = [
        *tiny,
        "strategy=fed_sb",  # its export builds a plain LoRA on a base: a copy of the server's model, not a load
        f"sim.num_clients={NUM_CLIENTS}",
        "sim.rounds=1",
        "data.partitioner=iid",
        f"run_dir={tmp_path / 'run'}",
    ]
    run_dir = run_simulation(overrides, client_app="load_counter:client_app")
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    per_process = Counter((r["pid"], r["program"]) for r in rows)
    server = {k: n for k, n in per_process.items() if k[1] == "flwr-simulation"}
    clients = {k: n for k, n in per_process.items() if k[1] != "flwr-simulation"}
    assert fl_sim == [] and os.getpid() not in {pid for pid, _ in per_process}, per_process
    assert list(server.values()) == [1], per_process  # the ServerApp's process: one load, the export included
    assert 1 <= len(clients) <= NUM_CLIENTS and set(clients.values()) == {1}, per_process  # one per client process
