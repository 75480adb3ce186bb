"""`fl-report DIR`: a table (Markdown + CSV) and PNG plots from a run folder or a sweep folder.

Reads every run folder below DIR (one with summary.json, config.yaml and metrics.jsonl) and writes, in
DIR: `report.md`, `report.csv` and the plots whose x-axis actually varies across the runs:
accuracy vs round per strategy, accuracy vs cumulative uplink bytes (log scale), accuracy vs ε. Runs that
differ only in `seed` are also aggregated into mean ± std (n) in `seeds.md`/`seeds.csv`, with a methods ×
swept-axis pivot and error-bar plots (`simulations/seeds.py`). When the runs vary the number of clients or
the partitioning (a study, `simulations/study.py`), report.md opens with a methods × partitioning pivot per
client count (readable labels, "did not learn" marks, which differences exceed the seeds' spread), and the
accuracy-vs-heterogeneity and vs-clients plots carry ± std error bars; the per-run table follows.
`--beside NAME=DIR2` puts another study's cells beside these in the pivots and pairs (rows "FedIT · NAME"), e.g. a
rescue study beside the study it reruns with another recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import OmegaConf

from fl import constants as K
from fl.app.cli import exit_on_user_error
from fl.outputs import best_round, late_swing, read_metrics
from privacy.settings import planned_epsilon
from simulations.seeds import flat_config, seed_report
from simulations.study import (
    DID_NOT_LEARN_MARGIN,
    is_study,
    majority_share,
    method_label,
    partition_label,
    study_report,
)
from strategies import get_strategy


def heterogeneity(cfg: Any) -> str:
    """A readable label of the partitioning."""
    d = cfg.data
    if d.partitioner == "dirichlet":
        return f"dirichlet α={d.alpha:g}"
    if d.partitioner == "pathological":
        return f"pathological k={d.labels_per_client}"
    return str(d.partitioner)


# the metric a task's column shows: a choice task's accuracy, a generation task's exact match
LM_EVAL_METRICS = ("acc", "exact_match")


def lm_eval_scores(summary: dict[str, Any]) -> dict[str, float]:
    """``{"lm_eval_<task>": score}`` of the run's adapter as `fl-eval RUN` scored it (summary.json's ``eval``).

    A task's score is its ``acc`` where lm-eval gives one, else its ``exact_match``; a run fl-eval has not scored
    has none (the report's column is empty there, and the seeds' mean counts only the runs scored).
    """
    tasks = summary.get("eval", {}).get("adapter", {}).get("tasks", {})
    out = {}
    for task, metrics in sorted(tasks.items()):
        metric = next((m for m in LM_EVAL_METRICS if m in metrics), None)
        if metric is not None:
            out[f"lm_eval_{task}"] = float(metrics[metric])
    return out


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every complete run folder below `root` (including `root` itself)."""
    runs = []
    for summary_path in sorted(root.rglob(K.SUMMARY_FILE)):
        run_dir = summary_path.parent
        cfg = OmegaConf.load(run_dir / K.CONFIG_FILE)
        summary = json.loads(summary_path.read_text())
        rows = read_metrics(run_dir)
        eps = [r["epsilon_max"] for r in rows if r.get("epsilon_max") is not None]
        # ‖Σ p_k B_k A_k − B̄Ā‖/‖Σ p_k B_k A_k‖ of each aggregation (NaN where a round had none)
        residuals = [
            float(r["residual"]) for r in rows if r.get("residual") is not None and r["residual"] == r["residual"]
        ]
        label = get_strategy(str(cfg.strategy.name)).describe(cfg.strategy)  # e.g. "Fed-SB r=32 (sketch init)"
        flat = flat_config(cfg)
        majority = majority_share(cfg)
        runs.append(
            {
                "run": str(run_dir.relative_to(root)) if run_dir != root else ".",
                "strategy": label,
                "method": method_label(flat),
                "partitioning": partition_label(flat),
                "rank": int(cfg.strategy.rank),
                "lr": float(cfg.strategy.lr),  # the client rate: runs of one method at two rates differ here
                "num_clients": int(cfg.sim.num_clients),
                "heterogeneity": heterogeneity(cfg),
                "alpha": float(cfg.data.alpha) if cfg.data.partitioner == "dirichlet" else None,
                "target_epsilon": planned_epsilon(cfg),
                "epsilon_spent": max(eps) if eps else None,
                "rounds": int(cfg.sim.rounds),
                "seed": int(cfg.seed),
                "final_accuracy": summary["final_accuracy"],
                "majority": majority,
                "did_not_learn": majority is not None
                and float(summary["final_accuracy"]) < majority + DID_NOT_LEARN_MARGIN,
                # the test accuracy of the round the validation split picks (None without one: no honest pick)
                "best_accuracy": best_round(rows)["best_round_accuracy"],
                # the largest round-to-round change of test accuracy in the last 3 rounds: how stable the final is
                "swing_last3": late_swing(rows, 3),
                **lm_eval_scores(summary),
                "cum_bytes_up": summary["cum_bytes_up"],
                "cum_bytes_down": summary["cum_bytes_down"],
                "wall_seconds": summary["wall_seconds"],
                "server_seconds": sum(float(r.get("aggregate_seconds") or 0.0) for r in rows),
                "residual_max": max(residuals) if residuals else None,
                "_rows": rows,
                "_flat": flat,
            }
        )
    return runs


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_round(runs: list[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, Any] = {}
    for r in runs:
        c = colors.setdefault(r["strategy"], f"C{len(colors)}")
        xs = [row["round"] for row in r["_rows"]]
        ys = [row["accuracy"] for row in r["_rows"]]
        ax.plot(xs, ys, color=c, alpha=0.8, marker="o", ms=3, label=r["strategy"])
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), title="strategy")
    ax.set(title="Held-out accuracy per round", xlabel="round", ylabel="accuracy (held-out test set)")
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_round.png")


def plot_final_vs(df: pd.DataFrame, x: str, out: Path, *, title: str, xlabel: str, fname: str) -> Path:
    """Final accuracy (mean over runs that share x) against a categorical or numeric x, a line per strategy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = sorted(df[x].unique(), key=lambda v: (isinstance(v, str), v))
    pos = {v: i for i, v in enumerate(order)}
    for strategy, g in df.groupby("strategy"):
        g = g.groupby(x, as_index=False)["final_accuracy"].mean()
        g = g.assign(_pos=g[x].map(pos)).sort_values("_pos")
        ax.plot(g["_pos"], g["final_accuracy"], marker="o", label=strategy)
    ax.set_xticks(range(len(order)), [str(v) for v in order])
    ax.legend(title="strategy")
    ax.set(title=title, xlabel=xlabel, ylabel="final accuracy (held-out test set)")
    ax.grid(alpha=0.3)
    return _save(fig, out / fname)


def plot_accuracy_vs_uplink(runs: list[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, Any] = {}
    for r in runs:
        c = colors.setdefault(r["strategy"], f"C{len(colors)}")
        rows = [row for row in r["_rows"] if row.get("cum_bytes_up", 0) > 0]
        ax.plot(
            [row["cum_bytes_up"] for row in rows],
            [row["accuracy"] for row in rows],
            color=c,
            marker="o",
            ms=3,
            alpha=0.8,
            label=r["strategy"],
        )
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), title="strategy")
    ax.set_xscale("log")
    ax.set(
        title="Accuracy vs communication",
        xlabel="cumulative uplink bytes, all clients (log scale)",
        ylabel="accuracy (held-out test set)",
    )
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "accuracy_vs_uplink.png")


def report(
    root: Path, beside: dict[str, Path] | None = None, name: str | None = None
) -> tuple[pd.DataFrame, list[Path]]:
    """Write report.md, report.csv and the plots into `root`; returns the table and the plot paths.

    ``beside`` (name → folder): other studies whose pivots rows stand beside this one's, named "FedIT · <name>"
    (this one's rows "· <name>", default its folder's name). Only the study section reads them; the per-run
    table, report.csv and seeds.md stay this folder's.
    """
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"No run folder (with {K.SUMMARY_FILE}) under {root}.")
    others = {}
    name = name or root.resolve().name
    if beside and name in beside:
        raise ValueError(f"--beside {name}=…: that name is DIR's own rows'; give --name another")
    for key, folder in (beside or {}).items():
        others[key] = load_runs(Path(folder))
        if not others[key]:
            raise FileNotFoundError(f"--beside {key}={folder}: no run folder (with {K.SUMMARY_FILE}) under it.")
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in runs])
    df = df.sort_values(["strategy", "num_clients", "heterogeneity"]).reset_index(drop=True)
    df.to_csv(root / "report.csv", index=False)
    # the per-run table: readable labels, not folder names (report.csv keeps the folder in `run`)
    shown = df.drop(columns=["alpha", "run", "strategy", "heterogeneity"]).dropna(axis="columns", how="all")
    shown["did_not_learn"] = shown["did_not_learn"].map({True: "did not learn", False: ""})
    shown["cum_bytes_up"] = (shown["cum_bytes_up"] / 1e6).round(2)
    shown["cum_bytes_down"] = (shown["cum_bytes_down"] / 1e6).round(2)
    shown = shown.rename(columns={"cum_bytes_up": "up MB", "cum_bytes_down": "down MB", "did_not_learn": "learned?"})
    plots = [plot_accuracy_vs_round(runs, root), plot_accuracy_vs_uplink(runs, root)]
    plots += seed_report(runs, root, markdown=markdown_table)
    study = is_study(runs + [r for other in others.values() for r in other])
    if study:  # the pivots per client count are the main table; the per-run table follows
        text, more = study_report(runs, root, markdown=markdown_table, name=name, beside=others or None)
        plots += more
        (root / "report.md").write_text(text + "\n## Every run\n\n" + markdown_table(shown))
    else:
        (root / "report.md").write_text(markdown_table(shown))
    dp = df.dropna(subset=["target_epsilon"])
    if dp["target_epsilon"].nunique() > 1 or (len(dp) and len(dp) < len(df)):
        eps = df.assign(
            target_epsilon=[f"ε={v:g}" if v == v and v is not None else "no DP" for v in df["target_epsilon"]]
        )
        plots.append(
            plot_final_vs(
                eps,
                "target_epsilon",
                root,
                title="Final accuracy vs privacy budget",
                xlabel="target ε of each client (sample-level DP-SGD, δ < 1/n_k)",
                fname="accuracy_vs_epsilon.png",
            )
        )
    return df, plots


def main(argv: list[str] | None = None) -> None:
    """`fl-report DIR [--beside NAME=DIR2 ...]`."""
    ap = argparse.ArgumentParser(prog="fl-report", description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="a run folder or a sweep folder")
    ap.add_argument(
        "--beside",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another study's folder whose cells stand beside DIR's in the pivots, rows named 'FedIT · NAME' "
        "(repeatable), e.g. a rescue study beside the study it reruns",
    )
    ap.add_argument("--name", help="DIR's rows' name when --beside is given (default: DIR's folder name)")
    args = ap.parse_args(argv)
    beside = {}
    for item in args.beside:
        key, sep, folder = item.partition("=")
        if not sep or not key or not folder:
            ap.error(f"--beside {item!r}: give NAME=DIR, e.g. --beside study=docs/study-runs")
        beside[key] = Path(folder)
    _, plots = exit_on_user_error("fl-report", lambda: report(Path(args.dir), beside, args.name))
    print((Path(args.dir) / "report.md").read_text())
    print((Path(args.dir) / "seeds.md").read_text())
    print("plots:", *[str(p) for p in plots], sep="\n  ")


if __name__ == "__main__":
    main()
