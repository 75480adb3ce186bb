"""simulations/bench_robust.py without running it: the grid's size and cells, the best defence, the goals."""

from __future__ import annotations

from fl.app.config import compose
from simulations.bench_robust import ATTACKS, DEFENCES, best_defence, cell, grid, report


def test_the_grid_is_the_issues() -> None:
    assert len(grid(None, smoke=False)) == 30  # 5 attacks x 6 defences (the issue's 5 + multikrum) on FFA-LoRA
    full = grid("median", smoke=False)
    assert len(full) == 30 + 8 + 4 and len(set(full)) == len(full)  # + FedIT/Fed-SB 2x2 each + a second seed
    assert {s for s, *_ in full} == {"ffa_lora", "fedit", "fed_sb"}
    some = grid(None, smoke=False, defences=["none", "multikrum"])  # --defences multikrum
    assert len(some) == 10 and {d for *_, d, _ in some} == {"none", "multikrum"}


def test_the_smoke_cells_compose() -> None:
    attacks = list(ATTACKS)
    for i, defence in enumerate(DEFENCES):
        compose(cell("ffa_lora", attacks[i % len(attacks)], defence, 0, smoke=True))
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


def test_a_report_over_some_defences_names_only_those() -> None:
    acc = {("ffa_lora", a, d, 0): 0.70 for a in ATTACKS for d in ("none", "multikrum")}
    acc[("ffa_lora", "sign flip (3/10)", "multikrum", 0)] = 0.66
    assert best_defence(acc) == "multikrum"
    text = report(acc, "multikrum")
    assert "| attack | none | multikrum |" in text and "krum on a clean run" not in text.replace("multikrum", "")
    assert "multikrum: every attack within 3 points of clean 70.00: worst sign flip (3/10) +4.00 → not met" in text
