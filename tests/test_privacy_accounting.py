"""Accounting, quietly and tightly: the plan's optimal RDP order, orders that widen at their edge, no Opacus
order warning from the σ search or a DP round, PRV beside RDP; and DP steps as the plan's first-class budget
(the plan's step count is the count the accountant records, under privacy.local_steps and privacy.local_epochs)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_app import train
from fl.app.workspace import get_workspace
from fl.wire import to_record
from privacy import ClientAccountant, client_plan, epsilon_after, plan_dp
from privacy.orders import DEFAULT_ORDERS, ORDER_WARNING, prv_epsilon, rdp_epsilon

# ε = 0.05 over 10 steps at q = 0.01: the optimum lies past Opacus' largest default order (63)
EDGE = {"target_epsilon": 0.05, "delta": 1e-5, "num_examples": 1000, "batch_size": 10, "steps_per_round": 10}


def _order_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if ORDER_WARNING in str(w.message)]


def test_a_plan_at_the_edge_of_the_orders_widens_them_and_matches_opacus_on_the_wider_orders() -> None:
    plan = plan_dp(**EDGE, planned_rounds=1, max_grad_norm=1.0, accountant="rdp")  # RDP's orders: its own test
    assert plan.rdp_max_order is not None and plan.rdp_order is not None
    assert plan.rdp_max_order > max(DEFAULT_ORDERS) and max(DEFAULT_ORDERS) < plan.rdp_order < plan.rdp_max_order
    eps, order, used = rdp_epsilon(plan.history(), plan.delta)
    ref = RDPAccountant()
    ref.history = plan.history()
    ref_eps, ref_order = ref.get_privacy_spent(delta=plan.delta, alphas=list(used))
    assert (eps, order) == (ref_eps, ref_order) == (pytest.approx(ref_eps), plan.rdp_order)
    assert EDGE["target_epsilon"] - 0.01 <= eps <= EDGE["target_epsilon"]
    assert (
        epsilon_after(plan.noise_multiplier, sample_rate=plan.sample_rate, steps=10, delta=plan.delta, accountant="rdp")
        == eps
    )
    with warnings.catch_warnings(record=True) as caught:  # Opacus' own default orders: looser, and it warns
        warnings.simplefilter("always")
        loose, _ = ref.get_privacy_spent(delta=plan.delta)
    assert loose > EDGE["target_epsilon"] and _order_warnings(caught)


def test_inside_the_orders_the_epsilon_is_opacus_own_and_the_plan_records_its_order() -> None:
    # the headline plan: σ = 0.7227 at q = 0.0204, 9 steps, δ = 8.1e-6, optimum at order 4.5
    plan = plan_dp(
        target_epsilon=3.0, delta=8.1e-6, num_examples=12_500, batch_size=256, steps_per_round=3, planned_rounds=3,
        max_grad_norm=0.1, accountant="rdp",
    )  # fmt: skip
    assert plan.noise_multiplier == pytest.approx(0.7227, abs=1e-3) and plan.rdp_order == 4.5
    assert plan.rdp_max_order == max(DEFAULT_ORDERS) and plan.dp_steps == 9
    assert plan.examples_seen == round(9 * plan.sample_rate * 12_500)
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=9)
    ref = RDPAccountant()
    ref.history = plan.history()
    assert acc.epsilon(plan.delta) == ref.get_epsilon(delta=plan.delta) and acc.optimal_order(plan.delta) == 4.5
    prv = prv_epsilon(plan.history(), plan.delta)
    assert 0 < prv < acc.epsilon(plan.delta)  # PRV is the tighter of the two here


def test_the_sigma_search_prints_no_order_warning_and_leaves_the_warning_filters_alone() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for eps in (0.05, 1.0, 8.0):
            plan_dp(**{**EDGE, "target_epsilon": eps}, planned_rounds=2, max_grad_norm=1.0, init_steps=1)
        assert not _order_warnings(caught)
        orders = [1.5, 2.0]  # not silenced globally: Opacus still warns for a caller of its own
        rdp_analysis.get_privacy_spent(orders=orders, rdp=[1.0, 0.1], delta=1e-5)
    assert _order_warnings(caught)


def test_prv_accounting_prints_no_order_warning() -> None:
    """PRV sizes its domain from an RDP bound at Opacus' default orders; with Fed-SB's init release (σ 9.5, q = 1)
    its optimum sat at the edge and warned from every PRV plan, accountant and the DP map's PRV column."""
    paper = {"target_epsilon": 3.0, "delta": 1 / 3000, "num_examples": 300, "batch_size": 32, "steps_per_round": 5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_dp(**paper, planned_rounds=1, max_grad_norm=0.1, accountant="prv", init_steps=1, init_share=0.1)
        prv = prv_epsilon(plan.history(), plan.delta)
        acc = ClientAccountant("prv")
        for sigma, q, n in plan.history():
            acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        spent = acc.epsilon(plan.delta)
    assert not _order_warnings(caught)
    assert spent == pytest.approx(prv) and 0 < prv <= 3.0 + 1e-2  # PRV's plan spends its target, within its error


# ------------------------------------------------------------------ DP steps, through the ClientApp


def _message(overrides: list[str], server_round: int) -> Message:
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
    return Message(content, 1, MessageType.TRAIN)


def _context(run_id: int, **node: Any) -> Context:
    config = {"partition-id": 0, "num-partitions": 2, "privacy-secure-rng": "false", **node}
    return Context(run_id=run_id, node_id=1, node_config=config, state=RecordDict(), run_config={})


@pytest.mark.parametrize("work", ["privacy.local_steps=3", "privacy.local_epochs=0.5"])
def test_the_plans_dp_steps_are_the_steps_taken_across_rounds_and_no_order_warning_is_printed(
    tiny: list[str], work: str, capfd: pytest.CaptureFixture[str]
) -> None:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid", "sim.rounds=2"]
    job += ["privacy=dp", "privacy.target_epsilon=3", "privacy.batch_size=32", "privacy.physical_batch=16", work]
    ws = get_workspace(job)
    ctx = _context(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = [dict(train(_message(job, rnd), ctx).content.metric_records[K.METRICS].items()) for rnd in (1, 2)]
    acc = ClientAccountant.from_config_record(ctx.state.config_records[K.STATE_PRIVACY])
    n = int(metrics[0][K.NUM_EXAMPLES])
    plan = client_plan(ws.privacy, n)
    assert ws.privacy.physical_batch == 16 and plan.batch_size == 32
    assert plan.dp_steps == plan.steps_per_round * 2 == acc.steps == sum(int(m[K.TRAIN_STEPS]) for m in metrics)
    assert acc.opacus.history == [(plan.noise_multiplier, plan.sample_rate, plan.dp_steps)]  # the steps taken
    if "epochs" in work:
        assert plan.steps_per_round == round(0.5 * n / 32)
    assert [m[K.DP_STEPS] for m in metrics] == [plan.steps_per_round, plan.dp_steps]
    assert metrics[1][K.NOISE_MULTIPLIER] == plan.noise_multiplier and metrics[1][K.EXAMPLES_SEEN] > 0
    assert metrics[1][K.EPSILON] <= 3.0
    assert not _order_warnings(caught) and ORDER_WARNING not in capfd.readouterr().err


def test_secure_rng_demanded_without_torchcsprng_says_what_to_do(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401

        pytest.skip("torchcsprng is installed: secure_mode works here")
    except ImportError:
        pass
    monkeypatch.delenv("FEDLORA_SIMULATION", raising=False)
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    job += ["privacy=dp", "privacy.target_epsilon=3"]
    node = {"partition-id": 0, "num-partitions": 2, "privacy-secure-rng": "true"}
    ctx = Context(run_id=6, node_id=1, node_config=node, state=RecordDict(),
                  run_config={})  # fmt: skip
    with pytest.raises(RuntimeError, match="privacy-secure-rng=false"):
        train(_message(job, 1), ctx)


def test_secure_rng_auto_uses_the_csprng_only_where_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy import noise

    monkeypatch.delenv("FEDLORA_SIMULATION", raising=False)
    monkeypatch.setattr(noise, "csprng_available", lambda: True)
    assert noise.secure_rng({}) is True and noise.secure_rng({"privacy-secure-rng": "auto"}) is True
    monkeypatch.setattr(noise, "csprng_available", lambda: False)
    assert noise.secure_rng({}) is False  # falls back, with one warning, instead of failing every DP round
    assert noise.secure_rng({"privacy-secure-rng": "true"}) is True  # demanded: make_private then names the fix
    monkeypatch.setenv("FEDLORA_SIMULATION", "1")
    monkeypatch.setattr(noise, "csprng_available", lambda: True)
    assert noise.secure_rng({}) is False  # simulations keep the seeded generator
    with pytest.raises(ValueError, match="privacy-secure-rng"):
        noise.secure_rng({"privacy-secure-rng": "maybe"})


@pytest.mark.parametrize("simulated", [False, True])
def test_a_deployed_nodes_dp_update_is_not_a_function_of_what_the_server_knows(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch, simulated: bool
) -> None:
    """The run seed is the server's: noise seeded from it could be regenerated and subtracted by the server. The
    same message to a fresh node gives a different DP update on a deployment node (privacy-secure-rng=false, no
    torchcsprng: torch's generator, seeded from the OS) and the same one in a simulation (reproducible runs)."""
    from fl.wire import from_record

    if simulated:
        monkeypatch.setenv("FEDLORA_SIMULATION", "1")
    else:
        monkeypatch.delenv("FEDLORA_SIMULATION", raising=False)
    job = [*tiny, "strategy=ffa_lora", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    dp = [*job, "privacy=dp", "privacy.target_epsilon=8", "privacy.batch_size=32", "privacy.local_steps=2"]

    def twice(overrides: list[str]) -> list[dict[str, Any]]:  # one message (the same start) to two fresh nodes
        msg = _message(overrides, 1)
        return [from_record(train(msg, _context(9)).content.array_records[K.ARRAYS]) for _ in range(2)]

    first, again = twice(dp)
    assert all(torch.equal(first[k], again[k]) for k in first) is simulated
    plain, plain_again = twice([*job, "train.local_steps=2"])
    assert all(torch.equal(plain[k], plain_again[k]) for k in plain)  # without DP the node is deterministic
