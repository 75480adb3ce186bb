"""A node's privacy policy on Flower's Deployment Runtime (2 SuperNodes on 127.0.0.1, insecure, tiny model).

Node 0 accepts ε ≤ 3 and keeps its accountant in its own folder; node 1 accepts only ε ≤ 1. The server asks for
ε = 3: node 0 trains and records every step on its disk, node 1 declines every round and the server logs why.
(In-process ClientApp tests of the other negatives: tests/test_privacy_policy.py.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from fl.deploy import LocalFederation, prepare_overrides
from fl.deploy.process import free_port
from fl.outputs import read_metrics
from privacy.policy import AccountantStore


@pytest.mark.slow
def test_deployed_nodes_enforce_their_own_policy_and_keep_their_accountant_on_disk(
    tiny: list[str], tmp_path: Path
) -> None:
    job = [
        *tiny,
        "strategy=fedit",
        "strategy.rank=2",
        "sim.rounds=2",
        "sim.min_train_clients=1",
        "data.partitioner=iid",
        "privacy=dp",
        "privacy.target_epsilon=3",
        "privacy.delta=1e-3",
        f"run_dir={tmp_path / 'run'}",
    ]
    overrides, run_dir = prepare_overrides(job, clients=2)
    state = tmp_path / "node0-state"
    policies = [
        f'privacy-epsilon=3 privacy-delta=1e-3 privacy-state-dir="{state}"',
        "privacy-epsilon=1",
    ]
    with LocalFederation(run_dir / ".deploy", insecure=True, client_threads=1) as fed:
        fed.start(2)
        nodes = []
        for pid, policy in enumerate(policies):
            log_path = fed.logs / f"supernode-{pid}.log"
            argv = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", fed.address]
            argv += ["--port", str(free_port()), "--insecure"]
            argv += ["--node-config", f"partition-id={pid} num-partitions=2 {policy}"]
            nodes.append((fed.procs.start(argv, env=fed.env, log_path=log_path), log_path))
        fed.wait_online(nodes)
        since = time.time_ns()
        run_id = fed.submit(overrides)
        fed.follow(run_dir, run_id, since_ns=since, rounds=2, timeout=600)
        server_log = (fed.logs / "serverapp.log").read_text(errors="replace")
    rows = read_metrics(run_dir)
    assert [(r["declined"], r["aggregated"]) for r in rows[1:]] == [(1, 1), (1, 1)], rows
    assert "declined to train: privacy.target_epsilon=3 exceeds this node's privacy-epsilon=1" in server_log
    store = AccountantStore(state, run_id=run_id, partition_id=0)
    acc = store.load()
    assert acc is not None and acc.steps == 2 * 2  # 2 rounds × train.local_steps=2, all on node 0's disk
    assert rows[2]["epsilon_max"] == pytest.approx(acc.epsilon(1e-3), rel=1e-9) and rows[2]["epsilon_max"] <= 3.0
