"""The DP map's grid, resumability and table (simulations/bench_dp_map.py, dp_map_report.py); cells are fl-sim runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fl.app.config import compose
from privacy import PrivacySettings
from simulations.bench_dp_map import (
    MAP_RATES,
    NON_DP_RATES,
    Cell,
    at_rate,
    best_cells,
    estimate,
    grid,
    main,
    paper_cells,
    run_map,
    with_own_rate_twins,
    with_settings,
)
from simulations.dp_map_report import OWN_RATE, line_label, plot, seeds_table, table
from simulations.harness import TINY
from simulations.harness import read_jsonl as read_done


def test_the_grid_is_methods_by_clients_by_steps_at_eps_3_with_non_dp_twins() -> None:
    cells = grid()
    assert len(cells) == 4 * 2 * 3 * 2 and len({c.key for c in cells}) == len(cells)  # FedSVD the fourth method
    assert sorted({c.dp_steps or 0 for c in cells}) == [9, 51, 150] and {c.epsilon for c in cells} == {3.0, None}
    steps = [c.dp_steps for c in cells]
    assert steps == sorted(steps, key=lambda n: n or 0)  # by DP steps first: a stopped map has whole columns
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
    assert "| ffa_lora | 3 | 51 | 3 | 67.0 | 77.0 | — | 10.0 |" in table(read_done(out))


def test_own_rate_twins_run_at_the_method_s_non_dp_rate_and_the_gap_is_to_the_better_twin(tmp_path: Path) -> None:
    cells = with_own_rate_twins(grid(["ffa_lora", "fed_sb"], [3], [3]))
    assert [(c.method, c.epsilon, c.variant) for c in cells] == [
        ("ffa_lora", 3.0, ""),
        ("ffa_lora", None, ""),
        ("ffa_lora", None, OWN_RATE),
        ("fed_sb", 3.0, ""),
        ("fed_sb", None, ""),
        ("fed_sb", None, OWN_RATE),
    ]
    own = cells[2]
    cfg = compose([*TINY, *own.overrides(batch=64, physical=32)])
    assert (
        cfg.strategy.lr
        == NON_DP_RATES["ffa_lora"]
        != compose([*TINY, *cells[1].overrides(batch=64, physical=32)]).strategy.lr
    )
    assert not PrivacySettings.from_config(cfg, init_releases=0).enabled

    def runner(cell: Cell, overrides: list[str]) -> dict[str, Any]:  # the same-rate twin diverges, as measured
        acc = {3.0: 0.53, None: 0.40}[cell.epsilon] if cell.variant != OWN_RATE else 0.70
        return {"accuracy": acc, "wall_s": 1.0}

    out = tmp_path / "map.jsonl"
    run_map(cells, out, runner=runner, batch=64, physical=32)
    assert "| ffa_lora | 3 | 9 | 3 | 53.0 | 40.0 | 70.0 | 17.0 |" in table(read_done(out))
    with pytest.raises(ValueError, match="no non-DP rate for method 'flexlora'"):
        with_own_rate_twins(grid(["flexlora"], [3], [3]))


def test_cells_at_another_rate_are_a_variant_whose_twin_is_its_own(tmp_path: Path) -> None:
    preset = grid(["ffa_lora"], [3], [50])
    assert compose([*TINY, *preset[0].overrides(batch=64, physical=32)]).strategy.lr == MAP_RATES["ffa_lora"]
    cells = at_rate(preset, 1e-2)
    assert [c.key for c in cells] == ["lr0.01-ffa_lora-c3-s50x3-eps3-seed0", "lr0.01-ffa_lora-c3-s50x3-off-seed0"]
    for cell in cells:
        assert compose([*TINY, *cell.overrides(batch=64, physical=32)]).strategy.lr == pytest.approx(1e-2)

    def runner(cell: Cell, overrides: list[str]) -> dict[str, Any]:
        acc = {(3.0, ""): 0.42, (None, ""): 0.43, (3.0, "lr0.01"): 0.65, (None, "lr0.01"): 0.74}
        return {"accuracy": acc[(cell.epsilon, cell.variant)], "wall_s": 1.0}

    out = tmp_path / "map.jsonl"
    run_map([*preset, *cells], out, runner=runner, batch=64, physical=32)
    report = table(read_done(out))
    assert "| ffa_lora | 3 | 150 | 3 | 42.0 | 43.0 | — | 1.0 |" in report
    assert "| ffa_lora (lr0.01) | 3 | 150 | 3 | 65.0 | 74.0 | — | 9.0 |" in report
    assert [c.variant for c in best_cells(read_done(out))] == ["", ""]  # ε ∈ {1, 8} stay on the preset's cells


def test_the_map_pins_rdp_and_a_variant_adds_prv_planning_or_a_server_optimizer_to_cell_and_twin() -> None:
    base = grid(["ffa_lora"], [10], [50])
    cfg = compose([*TINY, *base[0].overrides(batch=64, physical=32)])
    assert (cfg.privacy.accountant, cfg.train.precision) == ("rdp", "fp32")  # as the map ran, on any CPU
    bf16 = with_settings(base, "bf16", ["train.precision=bf16"])  # a variant may still choose its precision
    assert compose([*TINY, *bf16[0].overrides(batch=64, physical=32)]).train.precision == "bf16"
    prv = with_settings(base, "prv", ["privacy.accountant=prv"])
    assert [c.key for c in prv] == ["prv-ffa_lora-c10-s50x3-eps3-seed0", "prv-ffa_lora-c10-s50x3-off-seed0"]
    assert compose([*TINY, *prv[0].overrides(batch=64, physical=32)]).privacy.accountant == "prv"
    adam = with_settings(at_rate(base, 1e-2), "adam", ["server_opt=adam", "server_opt.lr=1e-2"])
    assert adam[0].key == "lr0.01-adam-ffa_lora-c10-s50x3-eps3-seed0"
    for cell in adam:  # the DP cell and its twin both step with the server optimizer
        cfg = compose([*TINY, *cell.overrides(batch=64, physical=32)])
        assert (cfg.server_opt.name, cfg.server_opt.lr, cfg.strategy.lr) == ("adam", pytest.approx(1e-2), 1e-2)
    with pytest.raises(ValueError, match="give a name and KEY=VALUE"):
        with_settings(base, "", ["server_opt=adam"])


def test_the_paper_regime_composes_with_epochs_its_batch_and_fed_sb_s_two_inits() -> None:
    cells = paper_cells(2.0)
    assert [c.epsilon for c in cells] == [3.0] * 4 + [None] * 4 and len({c.key for c in cells}) == 8
    for cell in cells:
        cfg = compose(cell.overrides(batch=64, physical=64))
        assert (cfg.sim.num_clients, cfg.sim.rounds, cfg.data.partitioner) == (3, 1, "iid")
        assert list(cfg.model.target_modules) == ["query", "value"] and cfg.strategy.lr == 5e-4
        p = PrivacySettings.from_config(cfg, init_releases=0)
        if cell.epsilon is None:
            assert not p.enabled and (cfg.train.local_epochs, cfg.train.batch_size) == (2.0, 32)
        else:
            assert p.enabled and (p.local_epochs, p.logical_batch, p.physical_batch) == (2.0, 32, 32)
        if cell.variant == "paper-init-public550":  # the init reads all 550 public tweets, as the authors' does
            assert (cfg.strategy.init, cfg.strategy.init_data, cfg.data.public_size) == ("server", "public", 550)
            assert cfg.strategy.init_examples * cfg.sim.num_clients >= cfg.data.public_size
        if cell.variant == "paper-init-federated":
            assert cfg.strategy.init == "federated"
    assert "paper-init-public550-fed_sb-c3-e2x1-eps3-seed0" in estimate(cells, [], batch=64)
    fed_sb_dp = paper_cells(2.0, methods=["fed_sb"], twins=False)  # --paper --methods fed_sb --no-twins
    assert [(c.variant, c.epsilon) for c in fed_sb_dp] == [("paper-init-public550", 3.0), ("paper-init-federated", 3.0)]
    fast = at_rate(fed_sb_dp, 1e-2)  # --paper --lr 1e-2: the paper's regime at the map's rate, a variant of its own
    assert [c.key for c in fast] == [
        "paper-init-public550-lr0.01-fed_sb-c3-e2x1-eps3-seed0",
        "paper-init-federated-lr0.01-fed_sb-c3-e2x1-eps3-seed0",
    ]
    assert compose(fast[0].overrides(batch=64, physical=64)).strategy.lr == 1e-2


def test_the_estimate_uses_the_map_s_own_rate_once_it_has_one() -> None:
    cells = grid(["ffa_lora"], [10], [3])
    first = estimate(cells, [], batch=64)  # 10 clients x 9 steps x 64 = 5,760 examples each
    assert "| ffa_lora-c10-s3x3-eps3-seed0 | 5,760 |" in first
    done = [{"key": "other", "method": "ffa_lora", "epsilon": 3.0, "examples": 3600.0, "wall_s": 3600.0}]
    assert "| ffa_lora-c10-s3x3-eps3-seed0 | 5,760 | 1.60 |" in estimate(cells, done, batch=64)  # at 1 example/s
    small = {"key": "small", "method": "ffa_lora", "epsilon": 3.0, "examples": 360.0, "wall_s": 36.0}
    assert "| 5,760 | 1.60 |" in estimate(cells, [*done, small], batch=64)  # the largest cell's rate, not the last


def test_the_plot_puts_a_rate_variant_and_an_own_rate_twin_at_that_rate_on_one_line(tmp_path: Path) -> None:
    cells = [*with_own_rate_twins(grid(["ffa_lora"], [3], [3])), *at_rate(grid(["ffa_lora"], [3], [50]), 1e-2)]
    out = tmp_path / "map.jsonl"
    run_map(cells, out, runner=lambda cell, overrides: {"accuracy": 0.5, "wall_s": 1.0}, batch=64, physical=32)
    rows = read_done(out)
    labels = {r["key"]: line_label(r) for r in rows}
    assert labels["own-rate-ffa_lora-c3-s3x3-off-seed0"] == labels["lr0.01-ffa_lora-c3-s50x3-off-seed0"]
    assert labels["own-rate-ffa_lora-c3-s3x3-off-seed0"] == "ffa_lora, lr 0.01"
    assert labels["ffa_lora-c3-s3x3-eps3-seed0"] == "ffa_lora"
    plot(rows, tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--paper", "--methods", "lora_fair"], "invalid choice: 'lora_fair'"),  # no pinned rate: not a map method
        (["--paper", "--own-rate-twins"], "--own-rate-twins is for the grid"),
        (["--variant", "adam", "--set", "server_opt.lrr=1"], "Could not override 'server_opt.lrr'"),
        (["--set", "server_opt=adam"], "give a name and KEY=VALUE"),
    ],
)
def test_the_map_s_command_line_rejects_what_it_would_silently_ignore(
    argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["bench_dp_map", "--out", str(tmp_path / "m.jsonl"), "--estimate", *argv])
    with pytest.raises(SystemExit):
        main()
    assert says in capsys.readouterr().err


def test_the_seeds_table_gives_mean_and_std_and_a_gap_only_over_seeds_with_both_arms() -> None:
    def row(method: str, seed: int, eps: float | None, acc: float, variant: str = "") -> dict[str, Any]:
        return {
            "method": method,
            "clients": 10,
            "local_steps": 50,
            "rounds": 3,
            "local_epochs": None,
            "seed": seed,
            "epsilon": eps,
            "variant": variant,
            "accuracy": acc,
            "dp_steps": 150,
        }

    rows = [
        row("fedsvd", 0, 3.0, 0.60),
        row("fedsvd", 1, 3.0, 0.64),
        row("fedsvd", 0, None, 0.74),
        row("fedsvd", 1, None, 0.76),
        row("fed_sb", 0, 3.0, 0.55),
        row("fed_sb", 1, 3.0, 0.59),
        row("fed_sb", 0, None, 0.70),  # seed 1's twin not run yet
        row("fedsvd", 0, 3.0, 0.66, "prv"),  # a variant is its own row, without a twin
    ]
    lines = seeds_table(rows).splitlines()
    assert "| fedsvd | 10 | 150 | 3 | 62.0 ± 2.8 | 0,1 | 75.0 ± 1.4 | 0,1 | 13.0 |" in lines
    assert "| fed_sb | 10 | 150 | 3 | 57.0 ± 2.8 | 0,1 | 70.0 | 0 | 15.0 |" in lines  # 70 − 55, seed 0 only
    assert "| fedsvd (prv) | 10 | 150 | 3 | 66.0 | 0 | — | — | — |" in lines
    assert len(lines) == 2 + 3
