"""fl-report on a heterogeneous-ranks sweep: a rank list is one setting, and one method at two ranks gets two rows;
the ready sweep's cells all compose."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from fl.app.config import compose
from simulations.seeds import flat_config, group_seeds, pivot
from simulations.sweep import expand, load_sweep


def _run(strategy: str, rank: int, ranks: list[int] | None, seed: int, acc: float, lr: float = 1e-3) -> dict[str, Any]:
    cfg = OmegaConf.create(
        {"strategy": {"name": strategy, "rank": rank, "lr": lr}, "sim": {"client_ranks": ranks}, "seed": seed}
    )
    return {
        "_flat": flat_config(cfg),
        "strategy": strategy,
        "seed": seed,
        "final_accuracy": acc,
        "best_accuracy": acc,
        "cum_bytes_up": 1,
        "cum_bytes_down": 1,
        "wall_seconds": 1.0,
    }


def test_ranks_group_into_one_row_per_method_and_rank() -> None:
    runs = [
        *(_run("fedit", 2, None, s, 0.5 + s / 100) for s in range(3)),
        *(_run("fedit", 16, None, s, 0.6) for s in range(3)),
        *(_run("flora", 16, [2, 4, 8, 16], s, 0.7) for s in range(3)),
    ]
    df, groups = group_seeds(runs)
    assert sorted(df["strategy"]) == ["fedit r=16", "fedit r=2", "flora"]
    assert set(df["n"]) == {3}
    assert df.loc[df["strategy"] == "fedit r=2", "final_mean"].item() == 0.51
    assert {g["axis"]["sim.client_ranks"] for g in groups} == {None, "[2, 4, 8, 16]"}


def test_one_method_at_two_rates_gets_two_rows_named_by_the_rate_and_the_pivot_keeps_both() -> None:
    runs = [
        *(_run("ffa_lora", 8, None, s, 0.45, lr=1e-2) for s in range(2)),
        *(_run("ffa_lora", 8, None, s, 0.50, lr=3e-3) for s in range(2)),
        *(_run("fed_sb", 32, None, 0, 0.44, lr=3e-3),),
    ]
    df, groups = group_seeds(runs)
    assert sorted(df["strategy"]) == ["fed_sb", "ffa_lora lr=0.003", "ffa_lora lr=0.01"]  # no rank: it is the same
    table = pivot(df, groups)
    assert len(table) == 3 and "0.500 ± 0.000 (n=2)" in table.to_string()


def test_where_a_run_ran_is_not_a_setting() -> None:
    a = flat_config(OmegaConf.create({"strategy": {"name": "fedit"}, "sim": {"runtime": "ray", "cpus": 2}}))
    b = flat_config(OmegaConf.create({"strategy": {"name": "fedit"}, "sim": {"runtime": "inline", "cpus": 1}}))
    assert a == b == {"strategy.name": "fedit"}  # Ray or in-process clients, a core or two: one setting, one row


def test_the_hetero_sweep_cells_compose() -> None:
    overrides, cases = load_sweep("hetero")
    cells = expand(overrides, cases)
    assert len(cells) == 15
    for cell in cells:
        cfg = compose(cell)
        if cfg.strategy.name != "fedit":
            assert list(cfg.sim.client_ranks) == [2, 4, 8, 16] and cfg.sim.client_rank_draw == "random"
