"""A node's privacy policy on Flower's Deployment Runtime (SuperNodes on 127.0.0.1, insecure, tiny model).

Node 0 accepts ε ≤ 3 and keeps its accountant in its own folder; node 1 accepts only ε ≤ 1. The server asks for
ε = 3: node 0 trains and records every step on its disk, node 1 declines every round and the server logs why.
Then a SuperNode killed mid-run and started again with the same node config keeps composing from its disk and
stops at its target. (In-process ClientApp tests of the other negatives: tests/test_privacy_policy.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl.app.processes import free_port
from fl.deploy import LocalFederation, prepare_overrides
from fl.outputs import read_metrics
from privacy.policy import AccountantStore

# The DP job both deployments below run (a node's own policy or ledger decides whether it trains).
DP_JOB = [
    "strategy.rank=2",
    "sim.rounds=2",
    "sim.min_train_clients=1",
    "data.partitioner=iid",
    "privacy=dp",
    "privacy.target_epsilon=3",
    "privacy.delta=1e-3",
]


def _supernode(fed: LocalFederation, name: str, node_config: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start an insecure SuperNode with `node_config` (its log: logs/<name>.log)."""
    log_path = fed.logs / f"{name}.log"
    argv = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", fed.address]
    # privacy-secure-rng=false: Opacus' secure_mode (the deployment default) needs torchcsprng, not installed here
    argv += ["--port", str(free_port()), "--insecure", "--node-config", f"{node_config} privacy-secure-rng=false"]
    return fed.procs.start(argv, env=fed.env, log_path=log_path), log_path


@pytest.mark.slow
def test_deployed_nodes_enforce_their_own_policy_and_keep_their_accountant_on_disk(
    tiny: list[str], tmp_path: Path
) -> None:
    job = [*tiny, "strategy=fedit", *DP_JOB, f"run_dir={tmp_path / 'run'}"]
    overrides, run_dir = prepare_overrides(job, clients=2)
    state = tmp_path / "node0-state"
    policies = [
        f'privacy-epsilon=3 privacy-delta=1e-3 privacy-state-dir="{state}"',
        "privacy-epsilon=1",
    ]
    with LocalFederation(run_dir / ".deploy", insecure=True, client_threads=1) as fed:
        fed.start(2)
        nodes = [
            _supernode(fed, f"supernode-{pid}", f"partition-id={pid} num-partitions=2 {policy}")
            for pid, policy in enumerate(policies)
        ]
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


@pytest.mark.slow
def test_a_supernode_killed_mid_run_continues_its_epsilon_from_disk_and_stops_at_its_target(
    tiny: list[str], tmp_path: Path
) -> None:
    """One node, budget planned for 2 of 3 rounds. It is killed (SIGTERM to its process group, by PID) as soon as
    its round-1 accountant is on disk — before its reply reaches the server — and started again with the same
    node config and folder (a new node id, an empty Context.state; a fresh run hands back no accountant)."""
    job = [
        *tiny,
        "strategy=fedit",
        "strategy.rank=2",
        "sim.rounds=3",
        "sim.min_train_clients=1",
        "sim.timeout=120",
        "privacy=dp",
        "privacy.target_epsilon=3",
        "privacy.delta=1e-3",
        "privacy.planned_rounds=2",  # σ for 2 rounds: a third would pass ε = 3
        f"run_dir={tmp_path / 'run'}",
    ]
    overrides, run_dir = prepare_overrides(job, clients=1)
    state = tmp_path / "node-state"
    node_config = f'partition-id=0 num-partitions=1 privacy-epsilon=3 privacy-delta=1e-3 privacy-state-dir="{state}"'
    with LocalFederation(run_dir / ".deploy", insecure=True, client_threads=1) as fed:
        fed.start(1)
        first = _supernode(fed, "supernode-0", node_config)
        fed.wait_online([first])
        since = time.time_ns()
        run_id = fed.submit(overrides)
        store = AccountantStore(state, run_id=run_id, partition_id=0)
        deadline = time.monotonic() + 180
        while (at_kill := store.load()) is None or at_kill.steps < 2:
            assert time.monotonic() < deadline, "node 0 never recorded its round-1 steps"
            time.sleep(0.1)
        fed.procs.refresh()  # remember its ClientApp processes, so the federation stops any straggler
        os.killpg(first[0].pid, signal.SIGTERM)  # the SuperNode and its ClientApp, by process group id = its PID
        first[0].wait(timeout=30)
        restarted = _supernode(fed, "supernode-0-restarted", node_config)
        fed.wait_online([restarted])
        fed.follow(run_dir, run_id, since_ns=since, rounds=3, timeout=300)
        wanted = "declined to train: its privacy budget is spent"
        log_deadline = time.monotonic() + 60  # the log stream may trail the run's last metrics line
        while wanted not in (server_log := (fed.logs / "serverapp.log").read_text(errors="replace")):
            if time.monotonic() > log_deadline:
                break
            time.sleep(0.5)
    rows = read_metrics(run_dir)[1:]
    final = store.load()
    assert final is not None and final.steps == 2 * 2  # 2 planned rounds × train.local_steps=2, across the restart
    trained = [r for r in rows if r["aggregated"]]
    assert 1 <= len(trained) <= 2 and sum(r["aggregated"] for r in rows) <= 2  # never more than its budget
    # the restarted node reported the ε of its disk record plus its new steps, not a fresh accountant's
    assert trained[-1]["epsilon_max"] == pytest.approx(final.epsilon(1e-3), rel=1e-9)
    assert at_kill.epsilon(1e-3) < trained[-1]["epsilon_max"] <= 3.0
    assert rows[-1]["declined"] == 1 and len(rows) == 3  # it stops at its target; the run still finishes
    assert "declined to train: its privacy budget is spent" in server_log and "after 4 steps" in server_log


@pytest.mark.slow
def test_a_deployed_nodes_lifetime_ledger_declines_a_federation_that_would_pass_it(
    tiny: list[str], tmp_path: Path
) -> None:
    """Issue 27's ledger across processes: a first federation (in-process, each node naming its ledger file)
    spends ε ≈ 3 of a lifetime 3.2 (two such runs compose to ≈ 3.39 here); a second, on the Deployment
    Runtime, whose SuperNodes name the same files, is declined by every node with what is left, and the
    ledgers still hold the first run only."""
    from loop_grid import LoopGrid

    from fl.app.server_app import run_server
    from fl.deploy import deploy
    from privacy.ledger import PrivacyLedger

    job = [*tiny, "strategy=ffa_lora", "sim.num_clients=2", *DP_JOB]
    nodes = {
        i: {
            "privacy-ledger": str(tmp_path / f"node{i}" / "ledger-tweets.json"),
            "privacy-lifetime-epsilon": "3.2",
            "privacy-secure-rng": "false",  # Opacus' secure_mode needs torchcsprng, not installed here
        }
        for i in (0, 1)
    }
    grid = LoopGrid(2)
    for (_, ctx), i in zip(sorted(grid.contexts.items()), (0, 1), strict=True):
        ctx.node_config.update(nodes[i])
    first = read_metrics(run_server(grid, [*job, f"run_dir={tmp_path / 'first'}"]))
    assert all(r["declined"] == 0 and r["aggregated"] == 2 for r in first[1:])
    spent = [PrivacyLedger(Path(nodes[i]["privacy-ledger"])).spent(1e-3) for i in (0, 1)]
    assert all(2.5 < s <= 3.0 for s in spent)
    second_dir = deploy([*job, f"run_dir={tmp_path / 'second'}"], insecure=True, timeout=600, node_configs=nodes)
    second = read_metrics(second_dir)
    got = [(r["round"], r.get("declined"), r.get("aggregated"), r.get("skipped")) for r in second]
    assert all(r["declined"] == 2 and r["aggregated"] == 0 for r in second[1:]), got
    log = (second_dir / ".deploy" / "logs" / "serverapp.log").read_text(errors="replace")
    assert "declined to train" in log and "privacy-lifetime-epsilon=3.2" in log and f"{3.2 - spent[0]:.3g} left" in log
    for i in (0, 1):
        assert len(PrivacyLedger(Path(nodes[i]["privacy-ledger"])).runs()) == 1
