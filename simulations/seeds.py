"""Repeated seeds in `fl-report`: runs that differ only in `seed` become one row with mean ± std and n.

Two runs are repeats when their resolved configs are equal once `seed` and the run's own paths are left
out, so any swept value (learning rate, rank, α …) keeps runs apart even where the per-cell table has no
column for it. Writes, next to report.md:

- ``seeds.md`` / ``seeds.csv``: one row per group — the strategy, the swept values, n, final and best
  accuracy as mean ± sample std (ddof 1; blank for n = 1), uplink and wall time means, and each lm-eval task
  `fl-eval` scored the runs on (``lm_eval_<task>``: mean ± std over the seeds scored, their count in ``_n``);
- a paper-style pivot in ``seeds.md`` (and ``pivot.csv``): methods as rows, the swept axis as columns,
  "mean ± std" in each cell;
- ``accuracy_vs_round_seeds.png`` (mean ± std band per group) and ``final_accuracy_seeds.png``
  (bars with std error bars), when any group has n ≥ 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

NOT_A_SETTING = {"seed", "run_dir", "resume", "cache_dir", "log_level"}
# where a run ran and what watched it, not what it computed: a cell of a parallel sweep (sim.cpus, a launcher's
# share) and a repeat run one after another, tracked or not, are the same setting; so are a run whose clients ran on
# Ray and one whose clients ran in fl-sim's process (sim.runtime=inline ends where Ray does: tests/golden_sweep.json)
RESOURCES = {"sim.cpus", "sim.client_cpus", "sim.client_gpus", "sim.ray_address", "sim.runtime", "train.threads"}
NOT_A_SETTING_PREFIXES = ("tracking.",)


def flat_config(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    """The run's settings as {dotted key: value}, without the seed and its paths."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):  # e.g. sim.client_ranks: one hashable, sortable value per setting
            out[prefix[:-1]] = json.dumps(node)
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {
        k: v
        for k, v in out.items()
        if k not in NOT_A_SETTING and k not in RESOURCES and not k.startswith(NOT_A_SETTING_PREFIXES)
    }


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Settings that differ between runs, except the strategy's own (its label is the row)."""
    keys = sorted({k for r in runs for k in r["_flat"]})
    return [
        k
        for k in keys
        if not k.startswith("strategy.") and len({json.dumps(r["_flat"].get(k), sort_keys=True) for r in runs}) > 1
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def group_seeds(runs: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per group of repeats: (table, groups with their member runs)."""
    axis = swept_keys(runs)
    groups: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = json.dumps(r["_flat"], sort_keys=True, default=str)
        g = groups.setdefault(
            key, {"strategy": r["strategy"], "axis": {k: r["_flat"].get(k) for k in axis}, "runs": []}
        )
        g["runs"].append(r)

    def same(g: dict[str, Any]) -> str:
        return json.dumps([g["strategy"], g["axis"]], sort_keys=True, default=str)

    alike: dict[str, list[dict[str, Any]]] = {}
    for g in groups.values():
        alike.setdefault(same(g), []).append(g)
    for twins in (t for t in alike.values() if len(t) > 1):  # one method at two ranks or rates: they name the rows
        for g in twins:
            g["strategy"] = f"{g['strategy']} {_telling_apart(g, twins)}"
    rows = []
    for g in groups.values():
        members = g["runs"]
        final_m, final_s = _mean_std([m["final_accuracy"] for m in members])
        lm_eval: dict[str, Any] = {}  # fl-eval's scores (report.lm_eval_scores), over the seeds it scored
        for key in sorted({k for m in members for k in m if k.startswith("lm_eval_")}):
            scored = [m[key] for m in members if m.get(key) is not None]
            mean, std = _mean_std(scored)
            lm_eval.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_n": len(scored)})
        best_m, best_s = _mean_std([m["best_accuracy"] for m in members])
        rows.append(
            {
                "strategy": g["strategy"],
                **g["axis"],
                "n": len(members),
                "seeds": " ".join(str(m["seed"]) for m in sorted(members, key=lambda m: m["seed"])),
                "final_mean": final_m,
                "final_std": final_s,
                "best_mean": best_m,
                "best_std": best_s,
                "up_MB_mean": float(np.mean([m["cum_bytes_up"] for m in members])) / 1e6,
                "down_MB_mean": float(np.mean([m["cum_bytes_down"] for m in members])) / 1e6,
                "wall_s_mean": float(np.mean([m["wall_seconds"] for m in members])),
                "server_s_mean": float(np.mean([m.get("server_seconds", float("nan")) for m in members])),
                "residual_max": max(
                    (m["residual_max"] for m in members if m.get("residual_max") is not None), default=None
                ),
                # the worst seed's largest round-to-round change in its last 3 rounds (report.load_runs)
                "swing_last3_max": max(
                    (m["swing_last3"] for m in members if m.get("swing_last3") is not None), default=None
                ),
                **lm_eval,
            }
        )
        g["label"] = axis_label(g["axis"])
    df = pd.DataFrame(rows).sort_values(["strategy", *axis]).reset_index(drop=True)
    return df, list(groups.values())


def _telling_apart(group: dict[str, Any], alike: list[dict[str, Any]]) -> str:
    """What tells `group` from the other groups of its method at the same swept values: the `strategy.*` settings
    that differ among them, e.g. ``r=2`` or ``lr=0.003`` (without them the rows would share a name and one would
    overwrite the other in the pivot)."""
    flats = [g["runs"][0]["_flat"] for g in alike]
    named = {k for f in flats for k in f if k.startswith("strategy.")}
    keys = sorted(k for k in named if len({json.dumps(f.get(k), default=str) for f in flats}) > 1)
    own = group["runs"][0]["_flat"]
    return ", ".join(f"{'r' if k == 'strategy.rank' else k.removeprefix('strategy.')}={own.get(k)}" for k in keys)


def axis_label(axis: dict[str, Any]) -> str:
    """A column title for one point of the swept axis, e.g. ``sim.num_clients=10, data.alpha=0.5``."""
    return ", ".join(f"{k}={v}" for k, v in axis.items()) or "final accuracy"


def mean_pm_std(mean: float, std: float, n: int) -> str:
    """``0.612 ± 0.013`` (``0.612`` when n = 1)."""
    return f"{mean:.3f}" if n < 2 or std != std else f"{mean:.3f} ± {std:.3f}"


def pivot(df: pd.DataFrame, groups: list[dict[str, Any]]) -> pd.DataFrame:
    """Methods as rows, the swept axis as columns, final accuracy mean ± std (n) in each cell."""
    cells: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for g in sorted(groups, key=lambda g: json.dumps(g["axis"], sort_keys=True, default=str)):
        finals = [m["final_accuracy"] for m in g["runs"]]
        mean, std = _mean_std(finals)
        if g["label"] not in columns:
            columns.append(g["label"])
        cells.setdefault(g["strategy"], {})[g["label"]] = f"{mean_pm_std(mean, std, len(finals))} (n={len(finals)})"
    table = pd.DataFrame.from_dict(cells, orient="index").reindex(columns=columns).fillna("")
    table.index.name = "method"
    return table.sort_index().reset_index()


def mean_std_band(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean and sample std over runs' per-round curves (cut to the shortest; std 0 for one run)."""
    length = min(len(c) for c in curves)
    arr = np.asarray([c[:length] for c in curves], dtype=float)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros(length)
    return np.arange(length), arr.mean(axis=0), std


def plot_round_bands(groups: list[dict[str, Any]], out: Path) -> Path:
    """Held-out accuracy per round: mean line and ± std band per group."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        xs, mean, std = mean_std_band([[row["accuracy"] for row in m["_rows"]] for m in g["runs"]])
        label = g["strategy"] + (f" [{g['label']}]" if g["axis"] else "") + f" (n={len(g['runs'])})"
        ax.plot(xs, mean, marker="o", ms=3, color=f"C{i % 10}", label=label)
        ax.fill_between(xs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2)
    ax.legend(fontsize=7)
    ax.set(title="Held-out accuracy per round (mean ± std over seeds)", xlabel="round", ylabel="accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_round_seeds.png", dpi=120)
    plt.close(fig)
    return out / "accuracy_vs_round_seeds.png"


def plot_final_bars(df: pd.DataFrame, groups: list[dict[str, Any]], out: Path) -> Path:
    """Final accuracy per method and swept value: bars with ± std error bars."""
    labels = sorted({g["label"] for g in groups})
    methods = sorted({g["strategy"] for g in groups})
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(labels) * len(methods) ** 0.5), 4.5))
    for j, method in enumerate(methods):
        means, stds = [], []
        for label in labels:
            finals = [
                m["final_accuracy"]
                for g in groups
                if g["strategy"] == method and g["label"] == label
                for m in g["runs"]
            ]
            mean, std = _mean_std(finals) if finals else (float("nan"), float("nan"))
            means.append(mean)
            stds.append(0.0 if std != std else std)
        xs = np.arange(len(labels)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=15)
    ax.legend(title="method", fontsize=7)
    ax.set(title="Final accuracy (mean ± std over seeds)", ylabel="final accuracy (held-out test set)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "final_accuracy_seeds.png", dpi=120)
    plt.close(fig)
    return out / "final_accuracy_seeds.png"


def seed_report(runs: list[dict[str, Any]], root: Path, *, markdown: Any) -> list[Path]:
    """Write seeds.md, seeds.csv, pivot.csv (and the plots when seeds repeat); returns the plot paths."""
    df, groups = group_seeds(runs)
    df.to_csv(root / "seeds.csv", index=False)
    table = pivot(df, groups)
    table.to_csv(root / "pivot.csv", index=False)
    shown = df.copy()
    shown["final accuracy"] = [mean_pm_std(m, s, n) for m, s, n in zip(df.final_mean, df.final_std, df.n, strict=True)]
    shown["best accuracy"] = [mean_pm_std(m, s, n) for m, s, n in zip(df.best_mean, df.best_std, df.n, strict=True)]
    shown = shown.drop(columns=["final_mean", "final_std", "best_mean", "best_std"])
    for key in [c[: -len("_mean")] for c in df.columns if c.startswith("lm_eval_") and c.endswith("_mean")]:
        trio = zip(df[f"{key}_mean"], df[f"{key}_std"], df[f"{key}_n"], strict=True)
        shown[key] = [mean_pm_std(m, s, int(n)) if n == n and n else "" for m, s, n in trio]
        shown = shown.drop(columns=[f"{key}_mean", f"{key}_std", f"{key}_n"])
    shown = shown.round(2)
    if "residual_max" in df:  # ~1e-8 for the exact methods: rounding would print 0
        shown["residual_max"] = [f"{v:.1e}" if v == v and v is not None else "" for v in df["residual_max"]]
    text = (
        "## Final accuracy by method (mean ± sample std over seeds; n runs each)\n\n"
        + markdown(table)
        + "\n## Every group of repeated seeds\n\n"
        + markdown(shown)
    )
    (root / "seeds.md").write_text(text)
    if df["n"].max() < 2:
        return []
    return [plot_round_bands(groups, root), plot_final_bars(df, groups, root)]
