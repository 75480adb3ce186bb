"""A node's lifetime budget for its data (privacy.ledger): every run's releases compose in one ledger file per
dataset, a run whose plan would pass what is left is declined with the figure, a server-side resume (a new Flower
run handed the earlier accountant) continues its entry. The ClientApp is called in-process, two runs in a row,
with Flower Messages and Contexts as a SuperNode passes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant

from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_app import train
from fl.app.workspace import get_workspace
from fl.wire import to_record
from privacy import ClientAccountant, client_plan
from privacy.ledger import LEDGER_ORDERS, LifetimeBudget, PrivacyLedger
from privacy.orders import epsilon_from_curve, rdp_curve
from privacy.policy import DECLINE_REASON, DECLINE_RECORD


def _message(overrides: list[str], server_round: int, *, accountant: ClientAccountant | None = None) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a Message needs a run
    ws = get_workspace(overrides)
    content = RecordDict({K.ARRAYS: to_record(trainable_state(ws.model))})
    content[K.CONFIG] = ConfigRecord(
        {
            K.SERVER_ROUND: server_round,
            K.PHASE: K.PHASE_TRAIN,
            K.OVERRIDES: json.dumps(overrides),
            K.ADAPTER_KIND: ws.kind,
        }
    )
    if accountant is not None:
        content[K.STATE_PRIVACY] = accountant.to_config_record()
    return Message(content, 1, MessageType.TRAIN)


def _node(tmp_path: Path, run_id: int, **extra: Any) -> Context:
    config = {
        "partition-id": 0,
        "num-partitions": 2,
        "privacy-state-dir": str(tmp_path / "node"),
        "privacy-ledger": "tweets",
        "privacy-secure-rng": "false",
        **extra,
    }
    return Context(run_id=run_id, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _job(tiny: list[str], eps: float) -> list[str]:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid", "sim.rounds=2"]
    return [*job, "privacy=dp", f"privacy.target_epsilon={eps}", "privacy.delta=1e-3", "privacy.batch_size=32"]


def _reason(reply: Message) -> str | None:
    if DECLINE_RECORD not in reply.content.config_records:
        return None
    assert not reply.content.array_records  # nothing computed from the data leaves the node
    return str(reply.content.config_records[DECLINE_RECORD][DECLINE_REASON])


def test_two_federations_in_a_row_share_the_ledger_and_the_second_is_declined_naming_what_is_left(
    tiny: list[str], tmp_path: Path
) -> None:
    first = _node(tmp_path, 1, **{"privacy-lifetime-epsilon": 3.5})  # two ε = 3 runs compose to ε ≈ 3.7
    for rnd in (1, 2):
        assert _reason(train(_message(_job(tiny, 3.0), rnd), first)) is None
    ledger = PrivacyLedger(tmp_path / "node" / "ledger-tweets.json")
    runs = ledger.runs()
    acc = ClientAccountant.from_config_record(first.state.config_records[K.STATE_PRIVACY])
    assert list(runs) == ["run-1-partition-0"] and runs["run-1-partition-0"]["history"] == [
        list(h) for h in acc.opacus.history
    ]
    spent = ledger.spent(1e-3)
    assert spent == pytest.approx(acc.epsilon(1e-3), rel=1e-6) and spent <= 3.0  # same curve, converted once
    # a second federation (another run id, its own node config) naming the same ledger file by path
    second = _node(tmp_path, 2, **{"privacy-ledger": str(ledger.path), "privacy-lifetime-epsilon": "3.5"})
    reason = _reason(train(_message(_job(tiny, 3.0), 1), second))
    assert reason is not None and f"has ε={3.5 - spent:.3g} left" in reason and "privacy-lifetime-epsilon=3.5" in reason
    assert "ledger 'tweets'" in reason and "1 earlier run(s)" in reason
    assert list(PrivacyLedger(ledger.path).runs()) == ["run-1-partition-0"]  # a restart reads the same file
    assert "composed by prv" in reason  # privacy.accountant=prv, the default since issue 41
    # a task that fits what is left trains, and its releases add to the ledger: both runs' histories composed by one
    # PRV accountant (the task's), or their RDP curves added
    assert _reason(train(_message(_job(tiny, 0.5), 1), second)) is None
    runs = ledger.runs()
    both = PRVAccountant()
    both.history = [tuple(h) for r in ("run-1-partition-0", "run-2-partition-0") for h in runs[r]["history"]]
    assert ledger.spent(1e-3) == pytest.approx(both.get_epsilon(delta=1e-3), rel=1e-9)
    total = np.asarray(runs["run-1-partition-0"]["rdp"]) + np.asarray(runs["run-2-partition-0"]["rdp"])
    by_rdp = ledger.spent(1e-3, accountant="rdp")
    assert by_rdp == pytest.approx(epsilon_from_curve(total, LEDGER_ORDERS, 1e-3)[0])
    assert spent < ledger.spent(1e-3) <= 3.5 and ledger.spent(1e-3) < by_rdp


def test_a_server_side_resume_continues_the_nodes_ledger_entry(tiny: list[str], tmp_path: Path) -> None:
    job = _job(tiny, 3.0)
    before = _node(tmp_path, 3, **{"privacy-lifetime-epsilon": 3.2})
    assert _reason(train(_message(job, 1), before)) is None
    kept = ClientAccountant.from_config_record(before.state.config_records[K.STATE_PRIVACY])  # the server's copy
    resumed = _node(tmp_path, 4, **{"privacy-lifetime-epsilon": 3.2})  # a new Flower run, an empty Context.state
    # a fresh entry would count round 1 twice (the earlier run + this run's whole plan) and pass ε = 3.2
    plan = client_plan(get_workspace(job).privacy, int(train_examples(job)))
    fresh = epsilon_from_curve(
        rdp_curve(kept.opacus.history, LEDGER_ORDERS) + rdp_curve(plan.history(), LEDGER_ORDERS), LEDGER_ORDERS, 1e-3
    )[0]
    assert fresh > 3.2
    assert _reason(train(_message(job, 2, accountant=kept), resumed)) is None
    runs = PrivacyLedger(tmp_path / "node" / "ledger-tweets.json").runs()
    assert list(runs) == ["run-4-partition-0"] and runs["run-4-partition-0"]["flower_runs"] == [
        "run-3-partition-0",
        "run-4-partition-0",
    ]
    assert sum(n for _, _, n in runs["run-4-partition-0"]["history"]) == 2 * plan.steps_per_round


def train_examples(job: list[str]) -> int:
    from fl.data import client_partition

    ws = get_workspace(job)
    return len(client_partition(ws.task, ws.cfg.data, pid=0, num_partitions=2, seed=int(ws.cfg.seed)))


def test_ledger_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="privacy-lifetime-epsilon needs privacy-ledger"):
        LifetimeBudget.from_node_config({"privacy-lifetime-epsilon": 8}, None)
    with pytest.raises(ValueError, match="set privacy-state-dir"):
        LifetimeBudget.from_node_config({"privacy-ledger": "tweets", "privacy-lifetime-epsilon": 8}, None)
    with pytest.raises(ValueError, match="needs privacy-lifetime-epsilon"):
        LifetimeBudget.from_node_config({"privacy-ledger": "tweets"}, str(tmp_path))
    with pytest.raises(ValueError, match="privacy-lifetime-epsilon='x' is not a number"):
        LifetimeBudget.from_node_config({"privacy-ledger": "t", "privacy-lifetime-epsilon": "x"}, str(tmp_path))
    got = LifetimeBudget.from_node_config({"privacy-ledger": "t", "privacy-lifetime-epsilon": "8"}, str(tmp_path))
    assert got == LifetimeBudget(path=tmp_path / "ledger-t.json", epsilon=8.0)
