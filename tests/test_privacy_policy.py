"""The node owns its privacy: a policy in its node config, enforced against the server's config, and an accountant
on the node's own disk that no copy from the server can lower. The ClientApp is called in-process here (Flower
Messages and Contexts, as a SuperNode would pass them); tests/test_privacy_deploy.py does it over a deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_app import evaluate_local, train
from fl.app.workspace import get_workspace
from fl.wire import to_record
from privacy import ClientAccountant
from privacy.policy import DECLINE_REASON, DECLINE_RECORD, AccountantStore, NodePolicy, parse_node_policies

OK = {"enabled": True, "target_epsilon": 3.0, "delta": 1e-3, "max_grad_norm": 1.0, "poisson_sampling": True}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"target_epsilon": 1.0, "delta": 1e-4, "max_grad_norm": 0.1}, None),  # more protection is fine
        ({"enabled": False}, "privacy.enabled=false"),
        ({"target_epsilon": 8.0}, "privacy.target_epsilon=8 exceeds this node's privacy-epsilon=3"),
        ({"delta": 1e-2}, "privacy.delta=0.01 exceeds this node's privacy-delta=0.001"),
        ({"max_grad_norm": 2.0}, "privacy.max_grad_norm=2 exceeds this node's privacy-max-grad-norm=1"),
        ({"poisson_sampling": False}, "poisson_sampling=false"),
    ],
)
def test_a_task_with_less_protection_than_the_policy_is_declined_with_its_reason(
    change: dict[str, Any], reason: str | None
) -> None:
    policy = NodePolicy.from_mapping({"privacy-epsilon": "3", "privacy-delta": 1e-3, "privacy-max-grad-norm": 1})
    got = policy.check(**{**OK, **change})
    assert got is None if reason is None else reason in str(got)
    assert NodePolicy().check(**{**OK, "enabled": False}) is None  # no policy: as before


def test_policy_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="privacy-epsilon='x' is not a number"):
        NodePolicy.from_mapping({"privacy-epsilon": "x"})
    with pytest.raises(ValueError, match="privacy-delta"):
        NodePolicy.from_mapping({"privacy-delta": "2"})
    with pytest.raises(ValueError, match="privacy-state-dir is a node's own setting"):
        parse_node_policies(["partition-id=0 privacy-state-dir=/tmp/x"])
    assert parse_node_policies(["partition-id=1 privacy-epsilon=2"]) == {1: NodePolicy(epsilon=2.0)}


def test_the_accountant_file_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    store = AccountantStore(tmp_path / "node", run_id=7, partition_id=1)
    assert store.load() is None
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=30)
    store.save(acc)
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=5)
    store.save(acc)
    back = store.load()
    assert back is not None and back.state_dict() == acc.state_dict()
    assert [p.name for p in (tmp_path / "node").iterdir()] == ["run-7-partition-1.json"]  # no temporary files left


# ------------------------------------------------------------------ the ClientApp, in-process


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


def _context(node_config: dict[str, Any]) -> Context:
    config = {"privacy-secure-rng": "false", **node_config}  # the seeded noise (no torchcsprng here)
    return Context(run_id=42, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _declined(reply: Message) -> str:
    metrics = dict(reply.content.metric_records[K.METRICS].items())
    assert metrics[K.DECLINED] == 1 and set(metrics) == {K.DECLINED, K.PARTITION_ID, K.SERVER_ROUND}  # not even n_k
    assert not reply.content.array_records and K.STATE_PRIVACY not in reply.content.config_records
    return str(reply.content.config_records[DECLINE_RECORD][DECLINE_REASON])


def test_the_node_declines_weaker_tasks_and_keeps_its_own_record(tiny: list[str], tmp_path: Path) -> None:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    node = {
        "partition-id": 0,
        "num-partitions": 2,
        "privacy-epsilon": 3.0,
        "privacy-delta": 1e-3,
        "privacy-state-dir": str(tmp_path / "node0"),
    }
    ctx = _context(node)
    assert "privacy.enabled=false" in _declined(train(_message([*job, "privacy=off"], 1), ctx))
    assert "exceeds this node's privacy-epsilon=3" in _declined(
        train(_message([*job, "privacy=dp", "privacy.target_epsilon=8", "privacy.delta=1e-3"], 1), ctx)
    )
    assert "privacy.delta=0.01 exceeds" in _declined(
        train(_message([*job, "privacy=dp", "privacy.delta=1e-2"], 1), ctx)
    )

    dp = [*job, "privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-3", "privacy.planned_rounds=4"]
    eps = []
    for rnd in (1, 2):  # from round 2 on the server hands back a fresh accountant: the node keeps its record
        reply = train(_message(dp, rnd, accountant=ClientAccountant("rdp") if rnd > 1 else None), ctx)
        assert K.ARRAYS in reply.content.array_records
        eps.append(float(reply.content.metric_records[K.METRICS][K.EPSILON]))
    store = AccountantStore(tmp_path / "node0", run_id=42, partition_id=0)
    on_disk = store.load()
    assert on_disk is not None and on_disk.steps == 4 and 0 < eps[0] < eps[1] <= 3.0
    assert on_disk.epsilon(1e-3) == pytest.approx(eps[1])

    restarted = _context(node)  # a SuperNode restart: empty Context.state, same disk; the server sends a reset copy
    reply = train(_message(dp, 3, accountant=ClientAccountant("rdp")), restarted)
    assert float(reply.content.metric_records[K.METRICS][K.EPSILON]) > eps[1]
    assert (store.load() or ClientAccountant()).steps == 6


def test_simulated_node_policies_come_from_the_config_and_no_policy_keeps_todays_behaviour(tiny: list[str]) -> None:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid", "privacy=off"]
    policies = "privacy.node_policies=['partition-id=1 privacy-epsilon=3']"
    node1 = {"partition-id": 1, "num-partitions": 2}
    assert "privacy.enabled=false" in _declined(train(_message([*job, policies], 1), _context(node1)))
    evaluated = evaluate_local(_message([*job, policies], 1), _context(node1))  # no un-noised metrics either
    assert evaluated.has_error() and "does not release un-noised evaluation" in str(evaluated.error.reason)
    reply = train(_message([*job, policies], 1), _context({"partition-id": 0, "num-partitions": 2}))
    assert K.ARRAYS in reply.content.array_records  # partition 0 has no policy
    reply = train(_message(job, 1), _context(node1))
    assert K.ARRAYS in reply.content.array_records and K.TRAIN_LOSS in reply.content.metric_records[K.METRICS]
