"""The sweep harness and the report: a 2x2 grid on the tiny model, resuming, a failing cell."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fl.outputs import read_metrics
from simulations.launch import Launch
from simulations.report import report
from simulations.sweep import expand, load_sweep, run_sweep


def test_ready_sweeps_expand_to_the_grids_they_promise() -> None:
    overrides, cases = load_sweep("main")
    cells = expand(overrides, cases)
    assert len(cells) == 3 * 4 * 3  # clients x strategies x heterogeneity cases
    assert len({" ".join(c) for c in cells}) == len(cells)
    overrides, cases = load_sweep("privacy")
    assert len(expand(overrides, cases)) == 4 * 4
    with pytest.raises(FileNotFoundError, match="ready sweeps"):
        load_sweep("nosuch")


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "sweep").glob("*.yaml"))
)
def test_every_ready_sweep_expands_and_its_first_and_last_cells_compose(name: str) -> None:
    from fl.app.config import compose

    cells = expand(*load_sweep(name))
    assert cells and len({" ".join(c) for c in cells}) == len(cells)  # no cell twice
    for cell in (cells[0], cells[-1]):  # a typo in a key or a group option fails here, not hours into the sweep
        compose(cell)


def _recording() -> bool:
    return os.environ.get("FEDLORA_RECORD_GOLDEN", "") not in ("", "0")


@pytest.fixture(scope="module")
def sweep(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One real 4-cell `fl-sweep` (FedIT, FFA-LoRA × 2, 3 clients; one round; tracked in MLflow) read by this
    module's tests: each cell is its own `fl-sim` process, so it runs once. It runs on Hydra's joblib launcher, 2
    cells at a time, and must reproduce the sequential sweep's metrics cell by cell (tests/golden_sweep.json,
    recorded one cell after another on Ray with `FEDLORA_RECORD_GOLDEN=1`). The cells run on `sim.runtime=inline`
    (the sweep is under test, not Flower's runtime: a tiny cell ~10 s of CPU instead of ~40 on Ray), so the golden
    file also checks that the inline runtime ends where Ray does; recording runs the cells on Ray."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = [*tiny, "sim.rounds=1", "data.partitioner=iid", "strategy=fedit,ffa_lora", "sim.num_clients=2,3"]
    overrides.append("tracking=mlflow")
    if not _recording():
        overrides.append("sim.runtime=inline")  # the sweep is one MLflow experiment (test below)
    joblib = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
    launch = Launch("joblib", jobs=2) if joblib and not _recording() else None  # None: one after another
    record = run_sweep(overrides, sweep_dir, launch=launch)
    assert all(c["status"] == "done" for c in record["cells"].values())
    if launch is not None:  # each cell's Ray had its share of the cores, not all of them
        assert "hydra.launcher.n_jobs=2" in launch.hydra_overrides(timeout=None)
        for entry in record["cells"].values():
            assert yaml.safe_load((Path(entry["dir"]) / "config.yaml").read_text())["sim"]["cpus"] == launch.cell_cpus()
    return sweep_dir, overrides


def test_sweep_writes_one_run_per_cell_and_a_report(sweep: tuple[Path, list[str]]) -> None:
    sweep_dir, _ = sweep
    df, plots = report(sweep_dir)
    assert len(df) == 4
    assert set(df["strategy"]) == {"FedIT", "FFA-LoRA"} and set(df["num_clients"]) == {2, 3}
    csv = pd.read_csv(sweep_dir / "report.csv")
    assert len(csv) == 4 and {"final_accuracy", "cum_bytes_up", "wall_seconds"} <= set(csv.columns)
    assert (csv["server_seconds"] > 0).all()  # the strategies' aggregate() time, summed over rounds
    residual = csv.groupby("strategy")["residual_max"].max()  # FedIT's mean of products ≠ product of means
    assert residual["FedIT"] > 1e-4 and residual["FFA-LoRA"] < 1e-5  # FFA-LoRA's shared A keeps it exact
    text = (sweep_dir / "report.md").read_text()  # 2 and 3 clients: a study, its pivots first
    assert text.startswith("## Final held-out accuracy") and "### 2 clients" in text and "### 3 clients" in text
    assert text.split("## Every run\n\n")[1].count("\n") == 4 + 2  # the per-run table: a row per run
    names = {p.name for p in plots}
    assert {"accuracy_vs_round.png", "accuracy_vs_uplink.png", "accuracy_vs_clients.png"} <= names
    assert all(p.stat().st_size > 5000 for p in plots)


def test_the_sweep_reproduces_the_sequential_sweep_cell_by_cell(sweep: tuple[Path, list[str]]) -> None:
    """tests/golden_sweep.json holds the sequential sweep's metrics, cell by cell: every Hydra launcher must
    reproduce them (here joblib, 2 at a time; tests/test_launchers.py the others). `FEDLORA_RECORD_GOLDEN=1` runs
    the fixture one cell after another and rewrites it — only on purpose."""
    from test_launchers import GOLDEN, assert_same_metrics, cell_metrics

    got = cell_metrics(sweep[0])
    if _recording():
        GOLDEN.write_text(json.dumps(dict(sorted(got.items())), indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert set(got) == set(want)
    assert_same_metrics(got, want)


def test_the_sweep_is_one_mlflow_experiment_with_one_run_per_cell(sweep: tuple[Path, list[str]]) -> None:
    # before the resume test below, which adds a run for the cell it resumes
    from mlflow.tracking import MlflowClient

    sweep_dir, _ = sweep
    cells = json.loads((sweep_dir / "sweep.json").read_text())["cells"]
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir.resolve()}/mlruns/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == sweep_dir.name]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4
    assert {r.data.tags["strategy"] for r in runs} == {"fedit", "ffa_lora"}
    assert {r.info.run_name for r in runs} == set(cells)
    for r in runs:
        assert r.data.metrics["accuracy"] == pytest.approx(
            read_metrics(Path(cells[r.info.run_name]["dir"]))[-1]["accuracy"]
        )


def test_interrupted_sweep_resumes_without_redoing_finished_cells(sweep: tuple[Path, list[str]]) -> None:
    sweep_dir, overrides = sweep
    cells = sorted((sweep_dir / "cells").iterdir())
    interrupted = cells[0]
    (interrupted / "summary.json").unlink()  # as if the sweep died while this cell ran
    before = {c.name: (c / "summary.json").stat().st_mtime_ns for c in cells[1:]}
    record = run_sweep(overrides, sweep_dir)
    assert all(c["status"] == "done" for c in record["cells"].values())
    assert (interrupted / "summary.json").is_file()
    assert before == {c.name: (c / "summary.json").stat().st_mtime_ns for c in cells[1:]}
    assert [e for e in record["cells"].values() if "seconds" in e] == [record["cells"][interrupted.name]]
    assert record["cells"][interrupted.name]["resumed"]  # its checkpoint.pt was there: `fl-sim resume=<cell>`
    assert json.loads((interrupted / "summary.json").read_text())["resumed_from_round"] == 1


def test_seeds_are_a_sweep_axis_and_a_failing_cell_is_recorded_while_the_sweep_goes_on(
    sweep: tuple[Path, list[str]], tiny: list[str], tmp_path: Path
) -> None:
    """One sequential sweep (the default launcher) of two cells: the first fails (a tokenizer that does not exist),
    is recorded, and the second, seed 1 of the fixture's FedIT / 2-client cell, still runs; the report then gives
    the two seeds' mean and std. (One sweep for both: each tiny cell costs ~40 s of the suite's 2 cores.)"""
    import shutil

    from simulations.report import load_runs

    base = [*tiny, "sim.rounds=1", "data.partitioner=iid", "strategy=fedit", "sim.num_clients=2", "sim.runtime=inline"]
    assert [c[-1] for c in expand([*base, "seed=0,1,2"])] == ["seed=0", "seed=1", "seed=2"]
    # seed 0 is the fixture's fedit / 2-client cell (same settings); run seed 1 beside it
    sweep_dir, _ = sweep
    seed0 = next(c for c in (sweep_dir / "cells").iterdir() if c.name.startswith("strategy-fedit__sim.num_clients-2"))
    shutil.copytree(seed0, tmp_path / "cells" / seed0.name)
    cases = [["seed=2", "model.tokenizer=/no/such/tokenizer"], ["seed=1"]]
    record = run_sweep(base, tmp_path, cases=cases)
    assert [e["status"] for e in record["cells"].values()] == ["failed", "done"]
    failed = next(e for e in record["cells"].values() if e["status"] == "failed")
    assert "/no/such/tokenizer" in (Path(failed["dir"]) / "FAILED.txt").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"].keys() == record["cells"].keys()
    _, plots = report(tmp_path)
    finals = sorted(r["final_accuracy"] for r in load_runs(tmp_path))
    seeds = pd.read_csv(tmp_path / "seeds.csv")
    assert len(seeds) == 1 and int(seeds["n"][0]) == 2 and seeds["seeds"][0] == "0 1"
    assert seeds["final_mean"][0] == pytest.approx(sum(finals) / 2)
    assert seeds["final_std"][0] == pytest.approx(abs(finals[1] - finals[0]) / 2**0.5)  # sample std, n = 2
    assert seeds["server_s_mean"][0] > 0 and seeds["residual_max"][0] > 0
    swings = [r["swing_last3"] for r in load_runs(tmp_path) if r["swing_last3"] is not None]
    assert seeds["swing_last3_max"][0] == pytest.approx(max(swings)) if swings else pd.isna(seeds["swing_last3_max"][0])
    pivot = pd.read_csv(tmp_path / "pivot.csv")
    assert list(pivot["method"]) == ["FedIT"]  # the strategy's report title
    cell = str(pivot.iloc[0, 1])
    assert "(n=2)" in cell and (("±" in cell) or finals[0] == finals[1])
    assert "mean ± sample std" in (tmp_path / "seeds.md").read_text()
    assert {"accuracy_vs_round_seeds.png", "final_accuracy_seeds.png"} <= {p.name for p in plots}
