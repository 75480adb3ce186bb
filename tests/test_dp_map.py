"""The DP map's grid and its resumability (simulations/bench_dp_map.py); the cells themselves are runs of fl-sim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.app.config import compose
from privacy import PrivacySettings
from simulations.bench_dp_map import TINY, Cell, best_cells, grid, read_done, run_map, table


def test_the_grid_is_methods_by_clients_by_steps_at_eps_3_with_non_dp_twins() -> None:
    cells = grid()
    assert len(cells) == 3 * 2 * 3 * 2 and len({c.key for c in cells}) == len(cells)
    assert sorted({c.dp_steps for c in cells}) == [9, 51, 150] and {c.epsilon for c in cells} == {3.0, None}
    dp, twin = Cell("ffa_lora", 3, 17, 3.0), Cell("ffa_lora", 3, 17, None)
    p = PrivacySettings.from_config(compose([*TINY, *dp.overrides(batch=64, physical=32)]), init_releases=0)
    assert (p.enabled, p.local_steps, p.logical_batch, p.physical_batch, p.planned_rounds) == (True, 17, 64, 32, 3)
    q = PrivacySettings.from_config(compose([*TINY, *twin.overrides(batch=64, physical=32)]), init_releases=0)
    assert (q.enabled, q.local_steps, q.logical_batch) == (False, 17, 64)  # the twin: same batch and steps


def test_the_map_resumes_skipping_finished_cells(tmp_path: Path) -> None:
    ran: list[str] = []

    def runner(cell: Cell, overrides: list[str]) -> dict[str, Any]:
        ran.append(cell.key)
        return {"accuracy": 0.5 + 0.01 * cell.local_steps + (0.1 if cell.epsilon is None else 0), "wall_s": 1.0}

    out = tmp_path / "map.jsonl"
    cells = grid(["ffa_lora"], [3], [3, 17])
    run_map(cells[:2], out, runner=runner, batch=32, physical=16)  # "stopped" after two cells
    run_map(cells, out, runner=runner, batch=32, physical=16)
    assert ran == [c.key for c in cells] and len(read_done(out)) == 4
    best = best_cells(read_done(out))
    assert [(c.local_steps, c.epsilon) for c in best] == [(17, 1.0), (17, 8.0)]
    assert "| ffa_lora | 3 | 51 | 3 | 67.0 | 77.0 | 10.0 |" in table(read_done(out))
