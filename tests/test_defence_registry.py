"""The defence registry (`strategies.defences`): a new defence is one class and one `register` call, its fields
join the strategy group and are checked at compose, it runs in a tiny federation (the real ServerApp and
ClientApp in-process through `LoopGrid`); the registry's refusals; client-level DP as a defence's declaration."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hydra.errors import ConfigCompositionException
from loop_grid import LoopGrid

from fl.adapters import fixed_state
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.app.workspace import get_workspace
from fl.config_defence import DefenceConfig
from fl.outputs import read_metrics
from strategies import get_strategy
from strategies import robust_math as rm
from strategies.client_dp import client_dp_wrapper
from strategies.defences import (
    DEFENCES,
    Defence,
    Kept,
    NormBound,
    UpdateSpace,
    get_defence,
    keep_all,
    make_defence,
    names,
    register,
    unregister,
)
from strategies.robust import RobustAggregation
from strategies.screening import Reply
from strategies.stats import RoundStats

NODES = 4
ATTACK = ["sim.attack=scale", "sim.attackers=[2]", "sim.rounds=2", f"sim.num_clients={NODES}", "data.partitioner=iid"]


@pytest.fixture(autouse=True)
def _registry_as_it_was() -> Iterator[None]:
    """Defences a test registers are gone after it (the composition matrix reads the registry)."""
    before = names()
    yield
    for name in names():
        if name not in before:
            unregister(name)


def _vec(*xs: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(xs, dtype=torch.float32)}


def _replies(*states: dict[str, torch.Tensor]) -> list[Reply]:
    return [Reply(node=100 + i, partition=i, state=s, metrics={}) for i, s in enumerate(states)]


def test_a_new_defence_is_one_class_and_one_register_call(tiny: list[str], tmp_path: Path) -> None:
    @dataclass
    class DropLargestConfig(DefenceConfig):
        drop_largest: int = 1  # updates dropped each round: those of largest norm

    class DropLargest(Defence):
        """Drop the `drop_largest` updates of largest norm (a rule made up for this test)."""

        name: ClassVar[str] = "drop_largest"
        schema: ClassVar[type[DefenceConfig]] = DropLargestConfig

        def __init__(self, drop_largest: int = 1) -> None:
            if drop_largest < 0:
                raise ValueError(f"strategy.drop_largest={drop_largest!r} is invalid: drop 0 or more updates.")
            self.drop = drop_largest

        def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
            norms = [rm.norm(space.update(r.state)) for r in replies]
            keep = sorted(sorted(range(len(replies)), key=norms.__getitem__)[: len(replies) - self.drop])
            stats.defence["defence_dropped"] = [r.partition for i, r in enumerate(replies) if i not in keep]
            stats.rejected += len(replies) - len(keep)
            return keep_all([replies[i] for i in keep], [weights[i] for i in keep])

    register("drop_largest", DropLargest)

    # by hand: norms 5, 1, 1 against a zero reference; the largest goes
    stats = RoundStats()
    kept = make_defence("drop_largest").apply(
        _replies(_vec(3, 4), _vec(0, 1), _vec(1, 0)), [1.0] * 3, reference=None, space="factors", stats=stats
    )
    assert [r.partition for r in kept.replies] == [1, 2] and stats.defence["defence_dropped"] == [0]

    # its field is strategy.drop_largest: checked at compose, a typo and a bad value refused naming the key
    assert (
        tuple(DEFENCES)[-1] == "drop_largest" and compose([*tiny, "strategy.drop_largest=2"]).strategy.drop_largest == 2
    )
    with pytest.raises(ConfigCompositionException, match=r"strategy\.drop_largets"):
        compose([*tiny, "strategy.drop_largets=2"])
    with pytest.raises(ValueError, match=r"strategy\.drop_largest=-1"):
        compose([*tiny, "strategy.defence=drop_largest", "strategy.drop_largest=-1"])
    with pytest.raises(ValueError, match="does not compose with client-level DP"):  # it did not declare it does
        compose([*tiny, "strategy.defence=drop_largest", "privacy=client"])

    # a tiny federation: the attacker's scaled update is the largest, dropped every round
    run_dir = tmp_path / "run"
    overrides = [*tiny, *ATTACK, "strategy=ffa_lora", "strategy.rank=2", f"run_dir={run_dir}"]
    run_server(LoopGrid(NODES), [*overrides, "strategy.defence=drop_largest", "strategy.drop_largest=1"])
    rows = read_metrics(run_dir)[1:]
    assert len(rows) == 2
    for row in rows:
        assert row["defence"] == "drop_largest" and row["defence_dropped"] == [2]
        assert row["aggregated"] == NODES - 1 and row["rejected"] == 1 and math.isfinite(row["loss"])

    unregister("drop_largest")  # its field leaves the strategy group with it
    with pytest.raises(ConfigCompositionException, match=r"strategy\.drop_largest"):
        compose([*tiny, "strategy.drop_largest=2"])


def test_an_unknown_defence_lists_the_registered_ones(tiny: list[str]) -> None:
    with pytest.raises(ValueError, match="use one of none, norm_bound, trimmed_mean, median, krum, multikrum"):
        compose([*tiny, "strategy.defence=krumm"])
    with pytest.raises(ValueError, match=r"strategy\.defence='nosuch'"):
        get_defence("nosuch")


def test_the_registry_refuses_clashes_and_bad_names() -> None:
    class Other(Defence):
        name: ClassVar[str] = "median"

    with pytest.raises(ValueError, match="already registered"):
        register("median", Other)
    with pytest.raises(ValueError, match="register it under that name"):
        register("another", Other)
    with pytest.raises(ValueError, match="Python identifier"):
        register("not a name", Other)

    @dataclass
    class FloatF(DefenceConfig):
        krum_f: float = 0.5  # Krum's krum_f is an int with default 1

    @dataclass
    class Rank(DefenceConfig):
        rank: int = 2  # every strategy has strategy.rank

    @dataclass
    class NoDefault(DefenceConfig):
        level: int

    for schema, match in [
        (FloatF, "also a field of defence 'krum'"),
        (Rank, "fields of every strategy"),
        (NoDefault, "needs a default"),
    ]:

        class Clash(Defence):
            name: ClassVar[str] = "clash"

        Clash.schema = schema
        with pytest.raises(ValueError, match=match):
            register("clash", Clash)
        assert "clash" not in names()


def test_client_level_dp_is_the_defences_declaration(tiny: list[str]) -> None:
    refusal = RobustAggregation.client_dp_problem(compose([*tiny, "strategy.defence=median"]))
    assert refusal is not None and refusal.endswith("use strategy.defence=none or norm_bound.")
    assert [n for n, cls in DEFENCES.items() if cls.client_dp_problem is None] == ["none", "norm_bound"]
    # under privacy=client the norm bound is built as the DP clip; built without it, the wrapper refuses it
    built = RobustAggregation.from_config(compose([*tiny, "privacy=client", "strategy.defence=norm_bound"]))
    assert isinstance(built.defence, NormBound) and built.defence.dp_clip and built.dp_clip_problem(0.1) is None
    assert make_defence("norm_bound", bound=0.1).dp_clip_problem(0.1) is not None
    assert get_defence("krum").client_dp_problem is not None


def test_the_client_level_dp_wrapper_sets_nothing_on_the_strategy_it_wraps(tiny: list[str]) -> None:
    overrides = [*tiny, "strategy=ffa_lora", "strategy.rank=2", "privacy=client", "strategy.defence=norm_bound"]
    cfg = compose(overrides)
    ws = get_workspace(overrides)
    strategy = get_strategy("ffa_lora").from_config(cfg, overrides=overrides, fixed=fixed_state(ws.model))
    before = {k: v for k, v in vars(strategy).items() if isinstance(v, (bool, int, float, str))}
    defence_before = dict(vars(strategy.robust.defence))
    wrapper = client_dp_wrapper(
        strategy, clipping="server", noise_multiplier=1.0, clip_norm=0.1, num_sampled_clients=3, epsilon_of=float
    )
    assert wrapper.strategy is strategy
    assert {k: v for k, v in vars(strategy).items() if isinstance(v, (bool, int, float, str))} == before
    assert dict(vars(strategy.robust.defence)) == defence_before

    plain = get_strategy("ffa_lora").from_config(
        compose([*tiny, "strategy=ffa_lora", "strategy.defence=norm_bound", "strategy.defence_bound=0.1"]),
        overrides=[],
        fixed=fixed_state(ws.model),
    )
    with pytest.raises(ValueError, match="would clip again"):
        client_dp_wrapper(
            plain, clipping="server", noise_multiplier=1.0, clip_norm=0.1, num_sampled_clients=3, epsilon_of=float
        )
