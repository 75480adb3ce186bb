"""Per-client evaluation (`data.client_test_fraction`, `sim.fraction_evaluate`): each client's seeded held-out
share, compose-time refusals of inconsistent configs, and FedIT's rounds scored by every client in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from loop_grid import LoopGrid

from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_app import evaluate_local
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.app.workspace import get_workspace
from fl.data import client_partition, client_test_indices, hold_out
from fl.outputs import read_metrics
from fl.wire import to_record

CLIENT_FIELDS = {
    K.CLIENT_ACCURACY_MEAN,
    K.CLIENT_ACCURACY_STD,
    K.CLIENT_ACCURACY_MIN,
    K.CLIENT_ACCURACY_MAX,
    K.CLIENT_LOSS_MEAN,
    K.CLIENTS_EVALUATED,
    K.CLIENTS_EVAL_FAILED,
}


def test_the_held_out_share_is_seeded_disjoint_and_never_everything() -> None:
    idx = np.arange(100, 140)
    train, test = hold_out(idx, 0.25, seed=3, pid=1)
    assert len(test) == 10 and len(train) == 30 and not set(train) & set(test)
    assert sorted([*train, *test]) == list(idx) and list(train) == sorted(train)  # partition order kept
    again = hold_out(idx, 0.25, seed=3, pid=1)
    assert np.array_equal(again[1], test) and not np.array_equal(hold_out(idx, 0.25, seed=3, pid=2)[1], test)
    assert len(hold_out(idx[:3], 0.5, seed=0, pid=0)[0]) >= 1  # at least one training example stays
    assert len(hold_out(idx[:3], 0.01, seed=0, pid=0)[1]) == 1  # and at least one is held out
    same, none = hold_out(idx, 0.0, seed=3, pid=1)
    assert np.array_equal(same, idx) and len(none) == 0


def test_clients_train_on_their_partition_less_the_held_out_share(tiny: list[str]) -> None:
    job = [*tiny, "strategy=fedit", "sim.num_clients=2", "data.partitioner=iid"]
    on = compose([*job, "data.client_test_fraction=0.2", "sim.fraction_evaluate=1.0"])
    ws = get_workspace(job)
    for pid in range(2):
        whole = client_partition(ws.task, compose(job).data, pid=pid, num_partitions=2, seed=0)
        train = client_partition(ws.task, on.data, pid=pid, num_partitions=2, seed=0)
        test = client_test_indices(ws.task, on.data, pid=pid, num_partitions=2, seed=0)
        assert sorted([*train, *test]) == sorted(whole) and len(test) == round(0.2 * len(whole))
        assert len(client_test_indices(ws.task, compose(job).data, pid=pid, num_partitions=2, seed=0)) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.client_test_fraction=0.2"], r"^data.client_test_fraction=0.2 is invalid: .*set sim.fraction_evaluate"),
        (["sim.fraction_evaluate=0.5"], r"^sim.fraction_evaluate=0.5 is invalid: .*set data.client_test_fraction"),
        (
            ["data.client_test_fraction=0.6", "sim.fraction_evaluate=1"],
            r"^data.client_test_fraction=0.6 is .*\(0, 0.5\]",
        ),
    ],
)
def test_an_inconsistent_request_is_refused_at_compose_in_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        compose(["strategy=fedit", *extra])
    assert "\n" not in str(err.value)


def test_fedit_rounds_are_scored_by_every_client(tiny: list[str], tmp_path: Path) -> None:
    grid = LoopGrid(3)
    overrides = [
        *tiny,
        "strategy=fedit",
        "strategy.rank=2",
        "sim.num_clients=3",
        "sim.rounds=2",
        "data.max_examples=240",
        "data.partitioner=iid",
        "data.client_test_fraction=0.25",
        "sim.fraction_evaluate=1.0",
        f"run_dir={tmp_path / 'run'}",
    ]
    rows = read_metrics(run_server(grid, overrides))
    assert not CLIENT_FIELDS & set(rows[0])  # round 0 is the server's initial evaluation only
    for row in rows[1:]:
        assert set(row) >= CLIENT_FIELDS and row[K.CLIENTS_EVALUATED] == 3 and row[K.CLIENTS_EVAL_FAILED] == 0
        assert row[K.CLIENT_ACCURACY_MIN] <= row[K.CLIENT_ACCURACY_MEAN] <= row[K.CLIENT_ACCURACY_MAX]
        assert row[K.CLIENT_ACCURACY_STD] >= 0 and "accuracy" in row
    evaluated = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluated) == 6 and all(K.PERSONAL not in m.content[K.CONFIG] for m in evaluated)


def test_a_client_without_a_held_out_share_says_so(tiny: list[str]) -> None:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a Message needs a run
    ws = get_workspace(job)
    conf = ConfigRecord({K.SERVER_ROUND: 1, K.PHASE: K.PHASE_EVALUATE, K.OVERRIDES: json.dumps(job)})
    msg = Message(RecordDict({K.ARRAYS: to_record(trainable_state(ws.model)), K.CONFIG: conf}), 1, MessageType.EVALUATE)
    node = {K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 2}
    reply = evaluate_local(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))
    assert reply.has_error() and "data.client_test_fraction" in reply.error.reason
