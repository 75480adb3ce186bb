"""FedSA-LoRA: the update rule (A and the head averaged, B̄ kept by the server, B never sent), the ClientApp keeping
each client's own B, refusals at compose time, and a real Flower simulation with per-client evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX, trainable_state
from fl.app.client_app import evaluate_local
from fl.app.config import compose
from fl.app.simulation import run_simulation
from fl.app.workspace import get_workspace
from fl.checkpoint import Checkpoint
from fl.outputs import read_metrics
from fl.wire import from_record, to_record
from strategies import FedSALoRA, get_strategy

A, B, HEAD = "m.q" + A_SUFFIX, "m.q" + B_SUFFIX, "classifier.modules_to_save.default.weight"
CLIENTS, R = 2, 2
LAYER_A = R * (4 * 32 + 32 + 64)  # tiny (hidden 32, intermediate 64): r·d_in over q, k, v, attn-out, inter, out
LAYER_B = (4 * 32 + 64 + 32) * R  # d_out·r over the same modules
TINY_HEAD = 32 * 3 + 3


def _strategy() -> FedSALoRA:
    return FedSALoRA(overrides=[], fixed={}, num_nodes=2, rounds=2, rank=2)


def test_the_server_averages_a_and_the_head_keeps_mean_b_and_sends_no_b() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [{A: torch.randn(2, 4, generator=gen), B: torch.randn(3, 2, generator=gen), HEAD: torch.randn(5)}]
    states.append({k: torch.randn(v.shape, generator=gen) for k, v in states[0].items()})
    weights = [30.0, 10.0]  # n_k: p = (0.75, 0.25)
    strategy = _strategy()
    agg = strategy.aggregate_arrays(1, states, weights)
    for name in (A, B, HEAD):  # Ā and the head go down; B̄ is the server's model (central evaluation, export)
        assert torch.allclose(agg[name], 0.75 * states[0][name] + 0.25 * states[1][name])
    content = strategy.arrays_for(7, to_record(agg))
    sent = from_record(content[K.ARRAYS])
    assert set(sent) == {A, HEAD} and torch.equal(sent[A], agg[A])
    conf = strategy.config_record(1, K.PHASE_EVALUATE)  # evaluate messages say it too: a client scores its own B
    assert list(conf[K.PERSONAL]) == [B_SUFFIX]
    assert get_strategy("fedsa_lora") is FedSALoRA


def test_refused_with_mixed_ranks_and_client_level_dp() -> None:
    with pytest.raises(ValueError, match=r"sim.client_ranks=\[2, 4\] gives clients ranks other than strategy.rank"):
        compose(["strategy=fedsa_lora", "sim.client_ranks=[2,4]"])
    with pytest.raises(ValueError, match="strategy=fedsa_lora does not compose with client-level DP"):
        compose(["strategy=fedsa_lora", "privacy=client"])


def _evaluate_message(overrides: list[str], arrays: dict[str, torch.Tensor]) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a Message needs a run
    conf = {
        K.SERVER_ROUND: 1,
        K.PHASE: K.PHASE_EVALUATE,
        K.OVERRIDES: json.dumps(overrides),
        K.ADAPTER_KIND: "lora",
        K.PERSONAL: [B_SUFFIX],
    }
    return Message(RecordDict({K.ARRAYS: to_record(arrays), K.CONFIG: ConfigRecord(conf)}), 1, MessageType.EVALUATE)


def test_a_client_scores_its_own_b_whatever_the_message_holds(tiny: list[str]) -> None:
    job = [*tiny, "strategy=fedsa_lora", f"strategy.rank={R}", "sim.num_clients=2", "data.partitioner=iid"]
    job += ["data.client_test_fraction=0.2", "sim.fraction_evaluate=1.0"]
    ws = get_workspace(job)
    sent = {n: torch.full_like(t, 0.25) for n, t in trainable_state(ws.model).items()}  # B too: a server that tries
    node = {K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 2}
    fresh = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    reply = evaluate_local(_evaluate_message(job, sent), fresh)
    assert not reply.has_error()
    now = trainable_state(ws.model)
    for name, t in now.items():  # before its first round: PEFT's B (zero), the server's A and head
        assert torch.equal(t, ws.initial[name] if name.endswith(B_SUFFIX) else sent[name]), name
    assert all(not bool(t.any()) for n, t in now.items() if n.endswith(B_SUFFIX))
    own = {n: torch.full_like(t, -0.5) for n, t in now.items() if n.endswith(B_SUFFIX)}
    kept = Context(
        run_id=1, node_id=1, node_config=node, state=RecordDict({K.STATE_PERSONAL: to_record(own)}), run_config={}
    )
    evaluate_local(_evaluate_message(job, sent), kept)
    for name, t in trainable_state(ws.model).items():  # after it has trained: its own B, never the sent one
        assert torch.equal(t, own[name] if name.endswith(B_SUFFIX) else sent[name]), name


def test_simulation_keeps_b_per_client_and_scores_each_client(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Flower simulation (Ray): clients' B differ after round 2, no message carried a B, the server's
    model is Ā with the example-weighted mean B̄, and metrics.jsonl has the spread of per-client accuracy."""

    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv("FEDLORA_SPY_DIR", str(spy))
    overrides = [
        *tiny,
        "strategy=fedsa_lora",
        f"strategy.rank={R}",
        "strategy.lr=0.01",
        f"sim.num_clients={CLIENTS}",
        "sim.rounds=2",
        "data.max_examples=160",
        "data.partitioner=iid",
        "data.client_test_fraction=0.25",
        "sim.fraction_evaluate=1.0",
        "sim.runtime=inline",  # fl-sim's whole path, its clients in this process (Ray's is test_simulation's)
        f"run_dir={tmp_path / 'run'}",
    ]
    run_dir = run_simulation(overrides, client_app="spy_client:app")
    rows = read_metrics(run_dir)
    for row in rows[1:]:
        assert row["aggregated"] == CLIENTS and row["clients_evaluated"] == CLIENTS and row["clients_eval_failed"] == 0
        assert row["floats_down"] == CLIENTS * (2 * LAYER_A + TINY_HEAD)  # Ā and the head: no B
        assert row["floats_up"] == CLIENTS * (2 * (LAYER_A + LAYER_B) + TINY_HEAD)  # B_k goes up (the server's B̄)
        accs = [row[f"client_accuracy_{s}"] for s in ("min", "mean", "max")]
        assert 0.0 <= accs[0] <= accs[1] <= accs[2] <= 1.0 and row["client_accuracy_std"] >= 0.0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["client_loss_mean"] > 0
    seen = [json.loads(line) for pid in range(CLIENTS) for line in (spy / f"{pid}.jsonl").read_text().splitlines()]
    assert {(s["round"], s["phase"]) for s in seen} == {(r, p) for r in (1, 2) for p in ("train", "evaluate")}
    assert all(s["received"] and not any(n.endswith(B_SUFFIX) for n in s["received"]) for s in seen)
    last = [torch.load(spy / f"{pid}-2.pt") for pid in range(CLIENTS)]
    names = sorted(last[0]["kept"])
    assert names and all(n.endswith(B_SUFFIX) for n in names)
    assert any(not torch.allclose(last[0]["kept"][n], last[1]["kept"][n]) for n in names)  # personal B's differ
    for k in last:  # a client keeps what it trained and uploaded
        assert all(torch.equal(k["kept"][n], k["sent"][n]) for n in names)
    total = sum(k["num_examples"] for k in last)
    server = Checkpoint.load(run_dir).arrays  # the server's global model after round 2
    for n in names:
        mean_b = sum(k["num_examples"] / total * k["sent"][n] for k in last)
        assert torch.allclose(server[n], mean_b, atol=1e-6), n
    a = names[0][: -len(B_SUFFIX)] + A_SUFFIX
    mean_a = sum(k["num_examples"] / total * k["sent"][a] for k in last)
    assert torch.allclose(server[a], mean_a, atol=1e-6)
