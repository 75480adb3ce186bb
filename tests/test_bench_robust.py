"""simulations/bench_robust.py without running it: the grid's size and cells, the best defence, the goals."""

from __future__ import annotations

from fl.app.config import compose
from simulations.bench_robust import ATTACKS, DEFENCES, best_defence, cell, grid, report


def test_the_grid_is_the_issues() -> None:
    assert len(grid(None, smoke=False)) == 25  # 5 attacks x 5 defences on FFA-LoRA
    full = grid("median", smoke=False)
    assert len(full) == 25 + 8 + 4 and len(set(full)) == len(full)  # + FedIT/Fed-SB 2x2 each + a second seed
    assert {s for s, *_ in full} == {"ffa_lora", "fedit", "fed_sb"}


def test_the_smoke_cells_compose() -> None:
    for attack, defence in zip(ATTACKS, DEFENCES, strict=True):
        compose(cell("ffa_lora", attack, defence, 0, smoke=True))
    compose(cell("fed_sb", "scale x100 (1/10)", "median", 0, smoke=True))


def test_best_defence_and_the_goals_from_accuracies() -> None:
    acc = {("ffa_lora", a, d, 0): 0.70 for a in ATTACKS for d in DEFENCES}
    acc[("ffa_lora", "scale x100 (1/10)", "none", 0)] = 0.42
    acc[("ffa_lora", "sign flip (3/10)", "norm_bound", 0)] = 0.50  # norm_bound's worst case is bad
    assert best_defence(acc) != "norm_bound"
    text = report(acc, "median")
    assert "no defence, scaling: 42.00 vs majority class 42 → met" in text
    assert (
        "median: every attack within 3 points of clean 70.00" in text and "norm_bound on a clean run costs 0.00" in text
    )
