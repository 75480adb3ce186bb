"""fl-report on a study: per-client-count pivots, "did not learn" marks, readable labels, pair verdicts.

Two real tiny runs (FedIT, FFA-LoRA; one round, 2 clients; in-process through the real ServerApp and ClientApp,
which write what a sweep's `fl-sim` cell writes) give the run-folder format; copies of them with another seed,
another partitioning and set final accuracies make a 2-seed, 2-column study whose numbers are known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from loop_grid import LoopGrid
from omegaconf import OmegaConf

from fl import constants as K
from fl.app.server_app import run_server
from simulations.report import main, report
from simulations.study import majority_share
from simulations.sweep import expand, load_sweep


def _copy(src: Path, dst: Path, *, seed: int, alpha: float | None, final: float, best: float) -> None:
    shutil.copytree(src, dst)
    cfg = OmegaConf.load(dst / K.CONFIG_FILE)
    cfg.seed = seed
    if alpha is not None:
        cfg.data.partitioner, cfg.data.alpha = "dirichlet", alpha
    OmegaConf.save(cfg, dst / K.CONFIG_FILE)
    summary = json.loads((dst / K.SUMMARY_FILE).read_text())
    summary["final_accuracy"] = final
    (dst / K.SUMMARY_FILE).write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (dst / K.METRICS_FILE).read_text().splitlines() if line.strip()]
    for row in rows:  # round 0 is the one the validation split picks; its test accuracy is the best round's
        row[K.VAL_ACCURACY] = 0.9 if row["round"] == 0 else 0.1
        row["accuracy"] = best if row["round"] == 0 else row["accuracy"]
    (dst / K.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def study(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    runs = tmp_path_factory.mktemp("runs")
    job = [*tiny, "sim.rounds=1", "data.partitioner=iid", "sim.num_clients=2"]
    real = {s: run_server(LoopGrid(2), [*job, f"strategy={s}", f"run_dir={runs / s}"]) for s in ("fedit", "ffa_lora")}
    root = tmp_path_factory.mktemp("study")
    cfg = OmegaConf.load(real["fedit"] / K.CONFIG_FILE)
    floor = {s: majority_share(OmegaConf.merge(cfg, {"seed": s})) for s in (0, 1)}
    assert all(f is not None for f in floor.values())
    finals = {  # (method, alpha, seed) -> final accuracy
        ("fedit", None, 0): 0.70,
        ("fedit", None, 1): 0.72,
        ("ffa_lora", None, 0): 0.60,
        ("ffa_lora", None, 1): 0.61,
        ("fedit", 0.1, 0): floor[0] + 0.01,  # within 2 points of the majority class: did not learn
        ("fedit", 0.1, 1): floor[1] + 0.015,
        ("ffa_lora", 0.1, 0): floor[0] + 0.03,  # learned, barely
        ("ffa_lora", 0.1, 1): floor[1] + 0.50,
    }
    for (method, alpha, seed), final in finals.items():
        name = f"{method}-{'iid' if alpha is None else alpha}-seed{seed}-cellfolder"
        # best round: 5 points above the final, except FedIT at alpha=0.1, which learned and then drifted away
        best = final + (0.30 if (method, alpha) == ("fedit", 0.1) else 0.05)
        _copy(real[method], root / "cells" / name, seed=seed, alpha=alpha, final=final, best=best)
    return root, {str(k): float(v) for k, v in floor.items() if v is not None}


def test_majority_share_is_the_largest_class_of_the_runs_own_test_split(tiny: list[str], tmp_path: Path) -> None:
    from fl.app.workspace import get_workspace

    overrides = [*tiny, "seed=1", f"run_dir={tmp_path}"]
    ws = get_workspace(overrides)
    labels = ws.task.test.labels
    expected = float(labels.bincount().max()) / len(labels)
    assert majority_share(ws.cfg) == pytest.approx(expected)


def test_study_pivot_per_client_count_with_mean_std_n_and_did_not_learn(study: tuple[Path, dict[str, float]]) -> None:
    root, _ = study
    report(root)
    pivot = pd.read_csv(root / "pivot_2_clients.csv")
    assert list(pivot.columns) == ["method", "IID", "Dirichlet α=0.1"]  # mild -> strong heterogeneity
    assert list(pivot["method"]) == ["FFA-LoRA", "FedIT"]
    cells = pivot.set_index("method")
    assert cells.loc["FedIT", "IID"] == "0.710 ± 0.014 (n=2)"
    assert cells.loc["FFA-LoRA", "IID"] == "0.605 ± 0.007 (n=2)"
    assert cells.loc["FedIT", "Dirichlet α=0.1"].endswith("— did not learn (2/2)")
    assert "did not learn" not in cells.loc["FFA-LoRA", "Dirichlet α=0.1"]
    assert "did not learn" not in cells.loc["FedIT", "IID"]
    runs = pd.read_csv(root / "report.csv")
    assert runs["did_not_learn"].sum() == 2 and runs["majority"].between(0.2, 0.8).all()


def test_a_second_pivot_shows_the_best_round_beside_the_final(study: tuple[Path, dict[str, float]]) -> None:
    root, floor = study
    report(root)
    best = pd.read_csv(root / "pivot_best_2_clients.csv").set_index("method")
    assert best.loc["FedIT", "IID"] == "0.760 ± 0.014 (n=2)"  # finals 0.70, 0.72 + 0.05
    drifted = (floor["0"] + 0.01 + floor["1"] + 0.015) / 2 + 0.30
    assert float(best.loc["FedIT", "Dirichlet α=0.1"].split(" ± ")[0]) == pytest.approx(drifted, abs=6e-4)
    assert "did not learn" not in " ".join(best.astype(str).to_numpy().ravel())  # a mark for finals only
    text = (root / "report.md").read_text()
    head, tail = text.split("## Best round's accuracy")
    assert "### 2 clients, best round" in tail and "## Final held-out accuracy" in head  # the final comes first


def test_pairs_say_whether_a_difference_exceeds_the_seeds_spread(study: tuple[Path, dict[str, float]]) -> None:
    root, _ = study
    report(root)
    pairs = pd.read_csv(root / "pairs.csv").set_index("partitioning")
    iid = pairs.loc["IID"]
    assert (iid["higher"], iid["lower"]) == ("FedIT", "FFA-LoRA")
    assert iid["difference (points)"] == pytest.approx(10.5, abs=0.05)
    assert iid["spread (points, std + std)"] == pytest.approx(100 * (0.02 + 0.01) / 2**0.5, abs=0.05)
    assert iid["exceeds the spread"] == "yes"
    assert pairs.loc["Dirichlet α=0.1", "exceeds the spread"] == "no"  # FFA-LoRA's seeds are 47 points apart


def test_labels_are_readable_and_no_folder_name_reaches_the_tables(study: tuple[Path, dict[str, float]]) -> None:
    root, floor = study
    _, plots = report(root)
    text = (root / "report.md").read_text()
    assert f"({min(floor.values()):.3f}–{max(floor.values()):.3f}, by seed)" in text  # each seed's own test split
    assert text.startswith("## Final held-out accuracy: methods × partitioning")
    assert "### 2 clients" in text and "| FFA-LoRA |" in text and "Dirichlet α=0.1" in text
    main = text.split("## Every run")[0]
    for folder in (root / "cells").iterdir():
        assert folder.name not in text
    assert "cellfolder" not in text and "cells/" not in text and "ffa_lora" not in main and "fedit" not in main
    assert "target_epsilon" not in text and "epsilon_spent" not in text  # no DP in these runs: no empty DP columns
    assert {"accuracy_vs_heterogeneity.png", "accuracy_vs_round_study.png"} <= {p.name for p in plots}
    assert all(p.stat().st_size > 5000 for p in plots)


def test_a_rescue_study_stands_beside_the_study_it_reruns(study: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    root, _ = study
    rescue = tmp_path / "rescue"
    shutil.copytree(root / "cells", rescue / "cells")
    for cell in (rescue / "cells").glob("fedit-0.1-*"):  # the study's did-not-learn cell, rescued
        summary = json.loads((cell / K.SUMMARY_FILE).read_text())
        summary["final_accuracy"] = 0.65 if "seed0" in cell.name else 0.66
        (cell / K.SUMMARY_FILE).write_text(json.dumps(summary))
    report(rescue, beside={"study": root})
    pivot = pd.read_csv(rescue / "pivot_2_clients.csv").set_index("method")
    assert list(pivot.index) == ["FFA-LoRA · rescue", "FFA-LoRA · study", "FedIT · rescue", "FedIT · study"]
    assert pivot.loc["FedIT · rescue", "Dirichlet α=0.1"] == "0.655 ± 0.007 (n=2)"
    assert pivot.loc["FedIT · study", "Dirichlet α=0.1"].endswith("— did not learn (2/2)")
    assert pivot.loc["FedIT · rescue", "IID"] == pivot.loc["FedIT · study", "IID"] == "0.710 ± 0.014 (n=2)"
    pairs = pd.read_csv(rescue / "pairs.csv")
    rescued = pairs[(pairs["higher"] == "FedIT · rescue") & (pairs["lower"] == "FedIT · study")]
    assert len(rescued) == 1 and rescued["partitioning"].item() == "Dirichlet α=0.1"
    text = (rescue / "report.md").read_text()
    assert "cellfolder" not in text.split("## Every run")[0]
    assert len(pd.read_csv(rescue / "report.csv")) == 8  # the per-run table stays the rescue's own runs
    with pytest.raises(FileNotFoundError, match="--beside empty="):
        report(rescue, beside={"empty": tmp_path / "nothing"})
    with pytest.raises(ValueError, match="give --name another"):  # two studies' rows under one name
        report(rescue, beside={"rescue": root})
    with pytest.raises(SystemExit):  # "--beside 'study': give NAME=DIR" on stderr, before anything is read
        main([str(rescue), "--beside", "study"])


def test_the_study_gives_every_cell_the_same_client_steps_and_runs_seed_0_first() -> None:
    from fl.app.config import compose

    cells = expand(*load_sweep("study"))
    assert len(cells) == 3 * 2 * 3 * 2  # methods x client counts x partitionings x seeds
    assert all("seed=0" in c for c in cells[:18]) and all("seed=1" in c for c in cells[18:])
    cfgs = [compose(c) for c in cells]
    steps = {c.sim.rounds * c.train.local_steps * round(c.sim.num_clients * c.sim.fraction_train) for c in cfgs}
    assert steps == {1000}
    assert {
        (c.sim.num_clients, c.data.partitioner, c.data.alpha if c.data.partitioner == "dirichlet" else None)
        for c in cfgs
    } == {(n, p, a) for n in (5, 20) for p, a in (("iid", None), ("dirichlet", 0.5), ("dirichlet", 0.1))}
    assert {c.strategy.name for c in cfgs} == {"fedit", "ffa_lora", "fed_sb"}
    assert {c.strategy.init for c in cfgs if c.strategy.name == "fed_sb"} == {"sketch"}
