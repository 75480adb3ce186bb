"""Client-level DP (`privacy=client`): Flower's DP wrappers around every registered strategy, the clipping bound,
the accountant against Opacus' RDP analysis, and config errors. Rounds run in-process: `LoopGrid` hands each
message to the real ClientApp (mods included) with one Context per node, so no Ray and no processes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from loop_grid import LoopGrid
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fl import constants as K
from fl.adapters import fixed_state, trainable_state
from fl.app.config import compose
from fl.app.simulation import run_simulation
from fl.app.workspace import get_workspace
from fl.outputs import read_metrics
from fl.wire import from_record, to_record
from privacy.client_level import ClientLevelPlan, client_level_epsilon, plan_client_level
from strategies import get_strategy, names
from strategies.client_dp import client_dp_wrapper

NODES = 3


def _job(tiny: list[str], strategy: str, *extra: str) -> list[str]:
    job = [*tiny, f"strategy={strategy}", "strategy.rank=2", f"sim.num_clients={NODES}", "data.partitioner=iid"]
    if strategy == "fed_sb":
        job.append("strategy.init=random")
    return [*job, "privacy=client", "sim.rounds=2", *extra]


def _run(overrides: list[str], rounds: int = 2) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Run `rounds` rounds of the wrapped strategy in-process; (strategy, wrapper, per-round arrays + stats)."""
    cfg = compose(overrides)
    ws = get_workspace(overrides)
    strategy = get_strategy(cfg.strategy.name).from_config(cfg, overrides=overrides, fixed=fixed_state(ws.model))
    plan = plan_client_level(cfg)
    wrapper = client_dp_wrapper(
        strategy,
        clipping=plan.clipping,
        noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm,
        num_sampled_clients=plan.sampled,
        epsilon_of=plan.epsilon,
    )
    seen: list[dict[str, Any]] = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> None:
        seen.append({"round": rnd, "arrays": from_record(arrays)})

    wrapper.start(LoopGrid(NODES), to_record(trainable_state(ws.model)), num_rounds=rounds, evaluate_fn=evaluate_fn)
    return strategy, wrapper, seen


@pytest.mark.parametrize("name", names())
def test_the_wrapper_composes_with_every_registered_strategy_or_refuses_it(tiny: list[str], name: str) -> None:
    overrides = _job(tiny, name, "privacy.client.target_epsilon=null", "privacy.client.noise_multiplier=0.5")
    cls = get_strategy(name)
    if cls.client_dp_problem is not None:
        with pytest.raises(ValueError, match=f"strategy={name} does not compose with client-level DP"):
            _run(overrides)
        return
    strategy, _, seen = _run(overrides)
    for rnd in (1, 2):
        st = strategy.stats[rnd]
        assert (st.sampled, st.aggregated, st.rejected, st.failed) == (NODES, NODES, 0, 0)
        assert st.bytes_up > 0 and st.floats_up > 0 and math.isfinite(st.residual)
        assert st.extra[K.CLIENT_DP_RELEASES] == rnd
        assert st.extra[K.CLIENT_DP_NOISE_STD] == pytest.approx(0.5 * 0.1 / NODES)
    assert set(seen[-1]["arrays"]) == set(seen[0]["arrays"])  # head and every adapter tensor, same names


def _global_and_replies(name: str, tiny: list[str], clipping: str) -> tuple[dict[str, Any], Any]:
    """Round 1 with σ = 0, keeping the global arrays sent and each client's (clipped) reply."""
    overrides = _job(
        tiny,
        name,
        "privacy.client.target_epsilon=null",
        "privacy.client.noise_multiplier=0",
        "privacy.client.clip_norm=0.01",  # below every update's norm here: every update is clipped
        f"privacy.client.clipping={clipping}",
        "strategy.lr=0.05",
    )
    strategy, _, seen = _run(overrides, rounds=1)
    return seen[0]["arrays"], (strategy, seen[1]["arrays"])


@pytest.mark.parametrize(("name", "clipping"), [("fedit", "server"), ("fed_sb", "client"), ("ffa_lora", "client")])
def test_each_update_is_clipped_to_c_and_the_noise_free_aggregate_is_their_plain_mean(
    tiny: list[str], name: str, clipping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies: list[dict[str, torch.Tensor]] = []  # what each client trained, before any clipping
    original = LoopGrid.send_and_receive

    def spy(self: LoopGrid, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = list(original(self, messages, timeout=timeout))
        replies.extend(from_record(m.content.array_records[K.ARRAYS]) for m in out if m.content.array_records)
        return out

    monkeypatch.setattr(LoopGrid, "send_and_receive", spy)
    start, (strategy, agg) = _global_and_replies(name, tiny, clipping)
    C = 0.01
    updates = [{k: r[k].double() - start[k].double() for k in start} for r in replies]
    norms = [math.sqrt(sum(float((u**2).sum()) for u in upd.values())) for upd in updates]
    assert len(updates) == NODES
    if clipping == "server":  # the server clipped: the replies were unclipped and larger than C
        assert min(norms) > C
        updates = [{k: u * min(1.0, C / n) for k, u in upd.items()} for upd, n in zip(updates, norms, strict=True)]
        assert strategy.stats[1].extra[K.CLIENT_DP_CLIPPED] == 1.0
    else:  # the node's mod clipped to exactly C (each raw update was larger)
        assert norms == pytest.approx([C] * NODES, rel=1e-4)
    mean = {k: sum(upd[k] for upd in updates) / NODES for k in start}  # equal weights, not n_k
    for k in start:
        torch.testing.assert_close(agg[k].double(), start[k].double() + mean[k], atol=1e-6, rtol=1e-5)


def test_a_node_that_did_not_clip_is_rejected_under_client_side_clipping(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LoopGrid.send_and_receive

    def no_clip(self: LoopGrid, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for m in messages[:1]:  # the first node's app runs without being asked to clip
            conf = m.content.config_records[K.CONFIG]
            if KEY_CLIPPING_NORM in conf:
                del conf[KEY_CLIPPING_NORM]
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(LoopGrid, "send_and_receive", no_clip)
    overrides = _job(
        tiny,
        "fedit",
        "privacy.client.target_epsilon=null",
        "privacy.client.noise_multiplier=0",
        "privacy.client.clip_norm=0.01",
        "privacy.client.clipping=client",
        "strategy.lr=0.05",
    )
    strategy, _, _ = _run(overrides, rounds=1)
    st = strategy.stats[1]
    assert (st.rejected, st.aggregated) == (1, NODES - 1)


def test_epsilon_over_rounds_is_opacus_prv_of_the_subsampled_gaussian(tiny: list[str]) -> None:
    """privacy.accountant=prv (the default since issue 41; RDP before): each round's ε is Opacus' own PRV accountant
    of the releases so far, below RDP's for the same releases."""
    overrides = _job(tiny, "fedit", "sim.fraction_train=0.67", "sim.min_train_clients=1", "sim.rounds=3")
    strategy, _, _ = _run(overrides, rounds=3)
    plan = plan_client_level(compose(overrides))
    q = 2 / NODES  # round(0.67 · 3) = 2 of 3 clients per round
    assert plan.sample_rate == q and plan.delta == pytest.approx(1 / (10 * NODES))
    assert plan.accountant == "prv" and plan.eps_error == 0.01
    for rnd in (1, 2, 3):
        prv = PRVAccountant()
        prv.history = [(plan.noise_multiplier, q, rnd)]
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=q, noise_multiplier=plan.noise_multiplier, steps=rnd, orders=orders)
        rdp_eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=plan.delta)
        eps = strategy.stats[rnd].extra[K.CLIENT_DP_EPSILON]
        assert eps == pytest.approx(prv.get_epsilon(delta=plan.delta), rel=1e-12) and eps < rdp_eps
        assert strategy.stats[rnd].sampled == 2
    assert 8.0 - 0.01 <= strategy.stats[3].extra[K.CLIENT_DP_EPSILON] <= 8.0  # σ planned for ε = 8 after 3 rounds
    resumed = type(strategy).from_config(
        compose(overrides), overrides=strategy.round_config.overrides, fixed=strategy.fixed
    )
    resumed.load_state_dict(strategy.state_dict())  # a checkpoint keeps the release count: ε keeps composing
    assert resumed.releases == 3


def test_sigma_from_a_target_and_given_directly() -> None:
    cfg = compose(["privacy=client", "privacy.client.target_epsilon=3", "sim.rounds=10", "sim.fraction_train=0.5"])
    plan = plan_client_level(cfg)
    assert plan.sampled == 5 and plan.epsilon(10) == pytest.approx(3.0, abs=0.01) and plan.epsilon(10) <= 3.0
    given = ClientLevelPlan(**{**plan.__dict__, "noise_multiplier": 2.0, "target_epsilon": None})
    assert given.epsilon(10) == client_level_epsilon(noise_multiplier=2.0, sample_rate=0.5, releases=10, delta=0.01)
    assert client_level_epsilon(noise_multiplier=0.0, sample_rate=0.5, releases=1, delta=1e-3) == math.inf
    assert client_level_epsilon(noise_multiplier=1.0, sample_rate=0.5, releases=0, delta=1e-3) == 0.0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["privacy.client.clip_norm=-1"], "privacy.client.clip_norm=-1.0 is invalid"),
        (["privacy.client.noise_multiplier=1.0"], "privacy.client.noise_multiplier=1.0 is invalid: give exactly one"),
        (["privacy.client.target_epsilon=null"], "privacy.client.noise_multiplier=None is invalid: give exactly one"),
        (["privacy.enabled=true"], "privacy.client.enabled=True is invalid"),
        (["privacy.client.clipping=both"], "privacy.client.clipping='both' is invalid"),
        (["privacy.client.delta=2"], "privacy.client.delta=2.0 is invalid"),
        (["strategy=fed_sb", "strategy.init=sketch"], "strategy.init='sketch' is invalid"),
        (["strategy=fed_sb"], "strategy.init='federated' is invalid"),
    ],
)
def test_a_bad_client_dp_config_is_one_line_naming_the_field(extra: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        compose(["privacy=client", *extra])
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_privacy_off_and_dp_leave_the_client_mode_off() -> None:
    for preset in ("off", "dp"):
        assert compose([f"privacy={preset}"]).privacy.client.enabled is False


def test_a_client_dp_simulation_logs_epsilon_per_round(tiny: list[str], tmp_path: Path) -> None:
    """One fl-sim run (inline): Fed-SB, node-side clipping through the ClientApp's mod, 2 of 3 clients a round."""
    overrides = [
        *_job(tiny, "fed_sb", "sim.fraction_train=0.67", "sim.min_train_clients=1", "privacy.client.clipping=client"),
        "sim.runtime=inline",
        f"run_dir={tmp_path / 'run'}",
    ]
    run_dir = run_simulation(overrides)
    rows = read_metrics(run_dir)
    plan = json.loads((run_dir / "client_dp_plan.json").read_text())
    assert (plan["sampled"], plan["population"], plan["planned_rounds"]) == (2, NODES, 2)
    for rnd in (1, 2):
        assert rows[rnd]["aggregated"] == 2 and rows[rnd]["rejected"] == 0
        assert rows[rnd][K.CLIENT_DP_RELEASES] == rnd
        eps = client_level_epsilon(
            noise_multiplier=plan["noise_multiplier"],
            sample_rate=2 / NODES,
            releases=rnd,
            delta=plan["delta"],
            accountant=plan["accountant"],
        )
        assert rows[rnd][K.CLIENT_DP_EPSILON] == pytest.approx(eps, rel=1e-12)
    assert rows[2][K.CLIENT_DP_EPSILON] <= 8.0 and (run_dir / "adapter").is_dir()


def test_a_node_with_a_sample_level_policy_declines_client_level_tasks_and_says_why() -> None:
    from privacy.session import policy_decline
    from privacy.settings import PrivacySettings

    settings = PrivacySettings.from_config(compose(["privacy=client"]), init_releases=0)
    reason = policy_decline(settings, {"privacy-epsilon": 3.0}, 0, 100)
    assert reason is not None and "privacy.enabled=false" in reason and "not protect this node's data" in reason
    assert policy_decline(settings, {}, 0, 100) is None  # no policy: the task runs


def test_a_method_that_does_not_compose_is_refused_before_the_simulation_starts(tiny: list[str]) -> None:
    with pytest.raises(ValueError, match=r"strategy=lora_fair does not compose with client-level DP .*B_k·A_k"):
        run_simulation([*tiny, "strategy=lora_fair", "privacy=client"])
