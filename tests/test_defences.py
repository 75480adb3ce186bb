"""Defences against hostile clients (`strategies.defences`): each rule on a hand-computed case, identities on
honest rounds, the claimed-weight cap, the attacks (`clients.attack`), and attackers clipped or dropped in real
tiny runs (the real ServerApp and ClientApp in-process through `LoopGrid`, and one on the Simulation Runtime)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid

from clients.attack import Attack, attacker_ids
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.app.simulation import run_simulation
from fl.outputs import read_metrics
from fl.wire import to_record
from strategies import robust_math as rm
from strategies.defences import make_defence
from strategies.robust import RobustAggregation
from strategies.screening import Reply
from strategies.stats import RoundStats

A, B = "m" + A_SUFFIX, "m" + B_SUFFIX  # one adapted module's factors (product space)


def _replies(*states: dict[str, torch.Tensor]) -> list[Reply]:
    return [Reply(node=100 + i, partition=i, state=s, metrics={}) for i, s in enumerate(states)]


def _apply(name: str, states: list[dict[str, torch.Tensor]], *, space: str = "factors", ref=None, **kw):  # type: ignore[no-untyped-def]
    stats = RoundStats()
    ref = ref or {k: torch.zeros_like(v) for k, v in states[0].items()}
    kept = make_defence(name, **kw).apply(
        _replies(*states), [1.0] * len(states), reference=to_record(ref), space=space, stats=stats
    )
    return kept, stats


def _vec(*xs: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(xs, dtype=torch.float32)}


# ---------------------------------------------------------------- each rule against a hand-computed case
def test_norm_bound_clips_to_a_fixed_bound_and_records_the_factor() -> None:
    kept, stats = _apply("norm_bound", [_vec(3, 4), _vec(0.6, 0.8)], bound=2.0)
    assert torch.allclose(kept.states[0]["w"], torch.tensor([1.2, 1.6]))  # norm 5 -> 2: factor 0.4
    assert torch.equal(kept.states[1]["w"], torch.tensor([0.6, 0.8]))  # norm 1 <= 2: untouched
    assert stats.defence["defence_clipped"] == {0: pytest.approx(0.4)}
    assert stats.defence["defence_norms"] == {0: pytest.approx(5.0), 1: pytest.approx(1.0)}


def test_norm_bound_median_is_the_median_of_the_rounds_norms() -> None:
    kept, stats = _apply("norm_bound", [_vec(3, 4), _vec(0.6, 0.8), _vec(0, 3)], bound="median")
    assert stats.defence["defence_bound"] == pytest.approx(3.0)  # median of 5, 1, 3
    assert torch.allclose(kept.states[0]["w"], torch.tensor([1.8, 2.4]))
    assert list(stats.defence["defence_clipped"]) == [0]


def test_norm_bound_in_the_product_space_bounds_b_times_a_exactly() -> None:
    ref = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0]])}
    # only A moves: the update of B·A is c·B·ΔA = c·[[1, 0], [0, 0]] -> c = 0.5 for a bound of 0.5
    kept, stats = _apply(
        "norm_bound", [{A: torch.tensor([[2.0, 0.0]]), B: ref[B]}], space="product", ref=ref, bound=0.5
    )
    assert torch.allclose(kept.states[0][A], torch.tensor([[1.5, 0.0]]))
    assert stats.defence["defence_clipped"][0] == pytest.approx(0.5)
    # both factors move (the update is quadratic in the shrink factor): the shrunk reply's norm is the bound
    gen = torch.Generator().manual_seed(0)
    state = {A: torch.randn(2, 5, generator=gen), B: torch.randn(4, 2, generator=gen), "head": torch.randn(3)}
    ref = {A: torch.randn(2, 5, generator=gen), B: torch.randn(4, 2, generator=gen), "head": torch.randn(3)}
    scale, full = rm.clip_scale(state, ref, bound=0.3, space="product")
    shrunk = rm.shrink(state, ref, scale)
    assert full > 0.3 and 0 < scale < 1
    assert rm.norm(rm.update_vector(shrunk, ref, space="product")) == pytest.approx(0.3, rel=1e-5)


def test_median_and_trimmed_mean_coordinate_wise() -> None:
    kept, _ = _apply("median", [_vec(1, 5), _vec(10, 6), _vec(2, 700)])
    assert kept.weights == [1.0] and torch.allclose(kept.states[0]["w"], torch.tensor([2.0, 6.0]))
    kept, _ = _apply("median", [_vec(1), _vec(2), _vec(3), _vec(100)])
    assert torch.allclose(kept.states[0]["w"], torch.tensor([2.5]))  # even count: mean of the middle two
    kept, stats = _apply("trimmed_mean", [_vec(1), _vec(2), _vec(3), _vec(4), _vec(100)], trim_fraction=0.2)
    assert torch.allclose(kept.states[0]["w"], torch.tensor([3.0]))  # mean of 2, 3, 4
    assert stats.defence["defence_trimmed"] == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_median_in_the_product_space_targets_the_median_product() -> None:
    a = torch.tensor([[1.0, 0.0]])
    states = [{A: a, B: torch.tensor([[b], [0.0]])} for b in (1.0, 2.0, 100.0)]
    kept, stats = _apply("median", states, space="product")
    assert torch.allclose(kept.states[0][A], a) and torch.allclose(kept.states[0][B], torch.tensor([[2.0], [0.0]]))
    assert stats.defence["defence_fit_residual"] == pytest.approx(0.0, abs=1e-9)


def test_krum_and_multikrum_keep_the_closest_and_drop_the_outlier_as_rejected() -> None:
    states = [_vec(0.0), _vec(0.1), _vec(0.2), _vec(10.0)]
    # n=4, f=1: each score is the one smallest squared distance: 0.01, 0.01, 0.01, 9.8² = 96.04
    kept, stats = _apply("krum", states, krum_f=1)
    assert [r.partition for r in kept.replies] == [0] and stats.rejected == 3
    assert stats.defence["defence_scores"][3] == pytest.approx(96.04, rel=1e-5)
    kept, stats = _apply("multikrum", states, krum_f=1)  # keeps n - f = 3
    assert [r.partition for r in kept.replies] == [0, 1, 2] and stats.defence["defence_dropped"] == [3]
    assert stats.rejected == 1
    kept, _ = _apply("multikrum", states, krum_f=1, multikrum_m=2)
    assert len(kept.replies) == 2


# ---------------------------------------------------------------- honest rounds: identities
@pytest.mark.parametrize("space", ["factors", "product"])
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_a_coordinate_rule_on_identical_replies_is_the_reply(name: str, space: str) -> None:
    gen = torch.Generator().manual_seed(1)
    state = {A: torch.randn(2, 6, generator=gen), B: torch.randn(5, 2, generator=gen), "head": torch.randn(3)}
    kept, _ = _apply(name, [dict(state) for _ in range(5)], space=space)
    for k, v in state.items():
        assert torch.allclose(kept.states[0][k], v, atol=1e-6), k


@pytest.mark.parametrize("space", ["factors", "product"])
def test_a_norm_bound_above_every_norm_is_the_identity(space: str) -> None:
    gen = torch.Generator().manual_seed(2)
    states = [{A: torch.randn(2, 6, generator=gen), B: torch.randn(5, 2, generator=gen)} for _ in range(3)]
    kept, stats = _apply("norm_bound", states, space=space, bound=1e6)
    assert all(s is r for s, r in zip(kept.states, states, strict=True)) and "defence_clipped" not in stats.defence


def test_the_claimed_weight_cap() -> None:
    replies, claimed = _replies(_vec(0), _vec(0), _vec(0)), [10.0, 20.0, 2000.0]
    stats = RoundStats()
    assert RobustAggregation(None, "median").weights(replies, claimed, stats) == [10.0, 20.0, 20.0]
    assert stats.defence["defence_capped"] == {2: 2000.0}
    assert RobustAggregation(None, "equal").weights(replies, claimed, RoundStats()) == [1.0, 1.0, 1.0]
    assert RobustAggregation(None, "100").weights(replies, claimed, RoundStats()) == [10.0, 20.0, 100.0]
    assert RobustAggregation(None, None).weights(replies, claimed, RoundStats()) == claimed


def test_the_defence_state_is_checkpointed_and_a_different_defence_is_refused() -> None:
    robust = RobustAggregation(make_defence("norm_bound", bound="median"))
    robust.apply(
        _replies(_vec(3, 4), _vec(1, 0)),
        [1.0, 1.0],
        reference=to_record(_vec(0, 0)),
        space="factors",
        stats=RoundStats(),
    )
    again = RobustAggregation(make_defence("norm_bound", bound="median"))
    again.load_state_dict(robust.state_dict())
    assert again.defence.state_dict() == {"history": [pytest.approx(3.0)]}
    with pytest.raises(ValueError, match=r"strategy\.defence=median"):
        RobustAggregation(make_defence("median")).load_state_dict(robust.state_dict())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy.defence=krumm"], "strategy.defence='krumm'"),
        (["strategy.defence=norm_bound"], "strategy.defence_bound"),
        (["strategy.defence=trimmed_mean", "strategy.trim_fraction=0.5"], "strategy.trim_fraction"),
        (["strategy.max_examples_weight=lots"], "strategy.max_examples_weight"),
        (["sim.attack=scale", "sim.attackers=[0,0]"], "sim.attackers"),
        (["sim.attack=scale", "sim.attackers=11"], "sim.attackers"),
        (["privacy=client", "strategy.defence=krum"], "does not compose with client-level DP"),
        (["privacy=client", "strategy.defence=norm_bound", "strategy.defence_bound=1"], "privacy.client.clip_norm"),
    ],
)
def test_bad_defence_and_attack_settings_fail_at_compose(tiny: list[str], overrides: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compose([*tiny, *overrides])


# ---------------------------------------------------------------- the attacks
def test_each_attack_changes_only_what_it_should() -> None:
    received, trained = _vec(1.0, 1.0), _vec(1.5, 0.5)
    assert torch.allclose(Attack("scale", 100).reply(trained, received, seed=0)["w"], torch.tensor([51.0, -49.0]))
    assert torch.allclose(Attack("sign_flip", 1).reply(trained, received, seed=0)["w"], torch.tensor([0.5, 1.5]))
    noisy = Attack("gaussian", 10).reply(trained, received, seed=0)["w"]
    assert not torch.allclose(noisy, trained["w"]) and torch.equal(
        noisy, Attack("gaussian", 10).reply(trained, received, seed=0)["w"]
    )
    assert Attack("num_examples", 100).num_examples(37) == 3700 and Attack("label_flip").num_examples(37) == 37
    assert torch.equal(Attack("label_flip").reply(trained, received, seed=0)["w"], trained["w"])


def test_attackers_are_drawn_with_the_seed_or_listed(tiny: list[str]) -> None:
    drawn = attacker_ids(compose([*tiny, "sim.attack=scale", "sim.attackers=3"]))
    assert len(drawn) == 3 and drawn == attacker_ids(compose([*tiny, "sim.attack=scale", "sim.attackers=3"]))
    assert attacker_ids(compose([*tiny, "sim.attack=scale", "sim.attackers=3", "seed=1"])) != drawn
    assert attacker_ids(compose([*tiny, "sim.attack=sign_flip", "sim.attackers=[4,1]"])) == [1, 4]
    assert attacker_ids(compose([*tiny, "sim.attackers=[4,1]"])) == []  # sim.attack=none: nobody attacks


# ---------------------------------------------------------------- real tiny runs
NODES = 4
ATTACK = ["sim.attack=scale", "sim.attackers=[2]", "sim.rounds=2", f"sim.num_clients={NODES}", "data.partitioner=iid"]


def _run(tiny: list[str], tmp_path: Path, *extra: str) -> list[dict]:  # type: ignore[type-arg]
    run_dir = tmp_path / "run"
    run_server(LoopGrid(NODES), [*tiny, *ATTACK, "strategy.rank=2", f"run_dir={run_dir}", *extra])
    return read_metrics(run_dir)[1:]


def test_an_attackers_reply_is_clipped_by_the_norm_bound_in_a_real_run(tiny: list[str], tmp_path: Path) -> None:
    rows = _run(tiny, tmp_path, "strategy=ffa_lora", "strategy.defence=norm_bound", "strategy.defence_bound=median")
    for row in rows:
        clipped = row[
            "defence_clipped"
        ]  # of 4 norms the median is between the middle two: the upper one is clipped a bit
        assert clipped["2"] < 0.05 and all(v > 0.5 for k, v in clipped.items() if k != "2")  # the attacker ~100-fold
        norms = row["defence_norms"]
        assert norms["2"] > 20 * max(v for k, v in norms.items() if k != "2")
        assert row["aggregated"] == NODES and row["rejected"] == 0 and math.isfinite(row["loss"])


def test_an_attackers_reply_is_dropped_by_krum_in_a_real_run_and_counted_rejected(
    tiny: list[str], tmp_path: Path
) -> None:
    rows = _run(tiny, tmp_path, "strategy=fedit", "strategy.defence=multikrum", "strategy.krum_f=1")
    for row in rows:
        assert row["defence_dropped"] == [2] and row["rejected"] == 1 and row["aggregated"] == NODES - 1


def test_a_claimed_count_is_capped_in_a_real_simulation(tiny: list[str], tmp_path: Path) -> None:
    """An fl-sim run (inline): the attacker claims 100x its examples; the cap at the round's median holds it."""
    run_dir = run_simulation(
        [
            *tiny,
            "strategy=fed_sb",
            "strategy.init=random",
            "strategy.rank=2",
            "sim.attack=num_examples",
            "sim.attackers=[1]",
            "sim.rounds=2",
            "sim.num_clients=3",
            "data.partitioner=iid",
            "strategy.max_examples_weight=median",
            "strategy.defence=median",
            "sim.runtime=inline",
            f"run_dir={tmp_path / 'sim'}",
        ]
    )
    for row in read_metrics(run_dir)[1:]:
        assert list(row["defence_capped"]) == ["1"] and row["defence"] == "median" and row["aggregated"] == 3


def test_under_client_level_dp_the_norm_bound_is_the_dp_clip(tiny: list[str], tmp_path: Path) -> None:
    rows = _run(tiny, tmp_path, "strategy=ffa_lora", "privacy=client", "strategy.defence=norm_bound")
    for row in rows:
        assert "2" in row["defence_clipped"] and row["defence"] == "norm_bound"  # recorded by the DP wrapper's clip
        assert "defence_norms" not in row  # the defence did not clip a second time
        assert row["aggregated"] == NODES


def test_a_resumed_run_with_a_defence_ends_where_the_uninterrupted_one_ends(tiny: list[str], tmp_path: Path) -> None:
    from fl.app.cli import resume_overrides
    from fl.checkpoint import Checkpoint

    job = [
        *tiny,
        *ATTACK,
        "strategy=ffa_lora",
        "strategy.rank=2",
        "strategy.defence=norm_bound",
        "strategy.defence_bound=median",
    ]
    run_server(LoopGrid(NODES), [*job, f"run_dir={tmp_path / 'full'}"])
    run_server(LoopGrid(NODES), [*job, "sim.rounds=1", f"run_dir={tmp_path / 'part'}"])
    assert Checkpoint.load(tmp_path / "part").strategy_state["robust"]["history"]  # the defence's state is saved
    run_server(LoopGrid(NODES), resume_overrides(str(tmp_path / "part"), ["sim.rounds=2"]))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["round"] for r in resumed] == [0, 1, 2]
    for a, b in zip(full, resumed, strict=True):
        for key in ("accuracy", "loss", "defence_bound"):  # round 0 has no defence_bound: None in both
            va, vb = a.get(key), b.get(key)
            assert (va is None and vb is None) or va == pytest.approx(vb, rel=1e-6), (key, a["round"])
        assert a.get("defence_clipped", {}).keys() == b.get("defence_clipped", {}).keys()
    assert len(Checkpoint.load(tmp_path / "part").strategy_state["robust"]["history"]) == 2
