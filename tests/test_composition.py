"""The composition matrix (issue 45; DESIGN.md "Crossing the axes"), generated from the registries by
`simulations.composition`: every pair of values of the compose-time axes (method, privacy, defence, ranks, server
optimizer, drift control) is in a cell that composes or is refused at compose with a message naming both keys;
then, for each method, composed cells holding every value it takes run for real — with and without an attack,
one stopped after round 1 and resumed — on the tiny model through the real ServerApp and ClientApp in-process
(`LoopGrid`), each ending with a finite loss and the fields its axes promise. docs/composition.md is the table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from loop_grid import LoopGrid

from fl.app.cli import resume_overrides
from fl.app.server_app import run_server
from fl.outputs import read_metrics
from simulations.composition import BASE, Matrix, Run, axes, cover, overrides, pairs, runs_for
from strategies import get_strategy, names
from strategies.robust import DEFENCES
from strategies.scaffold import scaffold_problem
from strategies.server_opt import SERVER_OPTIMIZERS

NODES = 3
FAST = {"fed_sb": ["strategy.init=random"]}  # Fed-SB's federated init is a round of its own: its tests cover it
ATTACK = ["sim.attack=scale", "sim.attackers=1"]


@pytest.fixture(scope="module")
def matrix(tiny: list[str]) -> Matrix:
    start = time.perf_counter()
    m = cover([*tiny, *BASE])
    print(f"\ncomposed {len(m.outcomes)} cells in {time.perf_counter() - start:.1f} s")
    return m


def test_the_axes_are_the_registries() -> None:
    ax = axes()
    assert ax["strategy"] == tuple(names()) and ax["defence"] == tuple(DEFENCES)
    assert ax["server_opt"] == tuple(SERVER_OPTIMIZERS) and ax["privacy"] == ("off", "dp", "client")
    assert all(values[0] in ("none", "off", "uniform") for a, values in ax.items() if a != "strategy")


def test_every_pair_composes_or_is_refused_naming_both_keys(matrix: Matrix) -> None:
    for outcome in matrix.outcomes:
        if outcome.refusal is not None:  # both values it refuses together are named by their keys
            assert len(outcome.named) >= 2, (overrides(outcome.cell), outcome.refusal)
    unsettled = [p for p in pairs(matrix.axes) if matrix.status(*sorted(p)) is None]
    assert sorted(map(sorted, unsettled)) == sorted(map(sorted, matrix.unreachable))
    for pair in matrix.unreachable:  # no cell may hold it: each method is refused with one of the two values
        for s in matrix.axes["strategy"]:
            assert any(frozenset({("strategy", s), v}) in matrix.refused for v in pair), (s, sorted(pair))
    for axis, values in matrix.axes.items():  # every value composes with something
        assert all(any(o.cell[axis] == v for o in matrix.composed()) for v in values), axis


def test_the_refusals_are_the_methods_declarations(matrix: Matrix) -> None:
    """Each method's refusals follow what it declares (mixed ranks, server optimizer, SCAFFOLD)."""
    for s in names():
        cls = get_strategy(s)

        def refused(axis: str, value: str) -> bool:
            found = matrix.status(("strategy", s), (axis, value))  # noqa: B023
            return found is not None and found.refusal is not None

        assert refused("ranks", "mixed") is not cls.mixed_ranks, s
        assert refused("server_opt", "adam") is (cls.server_opt_problem is not None), s
        no_defence = SimpleNamespace(strategy=SimpleNamespace(defence="none"))  # SCAFFOLD's rule of the method
        assert refused("drift", "scaffold") is (scaffold_problem(no_defence, cls) is not None), s


def _run(tiny: list[str], tmp_path: Path, run: Run) -> list[dict]:  # type: ignore[type-arg]
    cell = run.cell
    job = [*tiny, *BASE, *overrides(cell), *FAST.get(cell["strategy"], []), "data.partitioner=iid"]
    job += ATTACK if run.attack else []
    folder = tmp_path / "-".join(f"{v}" for v in cell.values()).replace("/", "_")
    if not run.resume:
        return read_metrics(run_server(LoopGrid(NODES), [*job, "sim.rounds=1", f"run_dir={folder}"]))
    job += ["privacy.planned_rounds=2"] if cell["privacy"] != "off" else []  # the budget spans both rounds
    run_server(LoopGrid(NODES), [*job, "sim.rounds=1", f"run_dir={folder}"])
    return read_metrics(run_server(LoopGrid(NODES), resume_overrides(str(folder), ["sim.rounds=2"])))


def _check(rows: list[dict], run: Run) -> None:  # type: ignore[type-arg]
    cell, last = run.cell, rows[-1]
    assert [r["round"] for r in rows] == list(range(3 if run.resume else 2))
    assert not last["skipped"] and last["aggregated"] >= 1 and math.isfinite(last["loss"])
    if cell["defence"] != "none":
        assert last["defence"] == cell["defence"]
    if cell["privacy"] == "dp":
        assert last["epsilon_max"] > 0
    if cell["privacy"] == "client":
        assert last["client_dp_epsilon"] > 0
    if cell["server_opt"] != "none":
        assert math.isfinite(last["server_step_ratio"])
    if cell["drift"] == "scaffold":
        assert math.isfinite(last["scaffold_c_norm"])
    if cell["ranks"] == "mixed":
        assert set(last["client_ranks"]) <= {1, 2}


@pytest.mark.parametrize("strategy", names())
def test_each_methods_composed_cells_run(
    tiny: list[str], tmp_path: Path, matrix: Matrix, strategy: str, one_thread
) -> None:  # type: ignore[no-untyped-def]
    """Composed cells of the method holding every value it takes, each for 1 round (the resumed one 1 + 1)."""
    runs = runs_for(matrix, strategy)
    took = []
    for run in runs:
        start = time.perf_counter()
        rows = _run(tiny, tmp_path, run)
        took.append(time.perf_counter() - start)
        _check(rows, run)
    assert any(r.attack for r in runs) and any(r.resume for r in runs)
    print(f"\n{strategy}: {len(runs)} runs in {sum(took):.1f} s ({', '.join(f'{t:.1f}' for t in took)})")
