"""The study's error-bar plots (`simulations.study`): final accuracy vs partitioning and vs clients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from simulations.seeds import mean_std_band


def _panels(n: int) -> tuple[plt.Figure, list[Any]]:
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1, 4.3), sharey=True, squeeze=False)
    return fig, list(axes[0])


def _floor(ax: Any, g: pd.DataFrame) -> None:
    majority = g["majority_mean"].dropna()
    if len(majority):
        ax.axhline(majority.mean(), color="grey", ls="--", lw=1, label="majority class")


def _errorbars(ax: Any, g: pd.DataFrame, x: str, positions: dict[Any, int], methods: list[str]) -> None:
    width = 0.12
    for j, method in enumerate(methods):
        m = g[g["method"] == method].assign(_pos=lambda d: d[x].map(positions)).sort_values("_pos")
        if not len(m):
            continue
        xs = m["_pos"].to_numpy(dtype=float) + (j - (len(methods) - 1) / 2) * width
        ax.errorbar(
            xs,
            m["final_mean"],
            yerr=np.nan_to_num(m["final_std"].to_numpy(dtype=float)),
            marker="o",
            capsize=4,
            color=f"C{j % 10}",
            label=method,
        )


def plot_vs_partitioning(df: pd.DataFrame, out: Path, *, order: Callable[[str], Any]) -> Path:
    """Final accuracy (mean ± std over seeds) vs partitioning, IID first; a panel per client count."""
    return _final_vs(
        df,
        out / "accuracy_vs_heterogeneity.png",
        x=("partitioning", sorted(df["partitioning"].unique(), key=order), "partitioning (more heterogeneous →)"),
        panel=("clients", sorted(df["clients"].unique()), "{} clients"),
        title="Final accuracy vs data heterogeneity",
    )


def plot_vs_clients(df: pd.DataFrame, out: Path, *, order: Callable[[str], Any]) -> Path:
    """Final accuracy (mean ± std over seeds) vs the number of clients; a panel per partitioning."""
    return _final_vs(
        df,
        out / "accuracy_vs_clients.png",
        x=("clients", sorted(df["clients"].unique()), "number of clients"),
        panel=("partitioning", sorted(df["partitioning"].unique(), key=order), "{}"),
        title="Final accuracy vs number of clients",
    )


def _final_vs(
    df: pd.DataFrame, path: Path, *, x: tuple[str, list[Any], str], panel: tuple[str, list[Any], str], title: str
) -> Path:
    """Final accuracy per method against column x = (name, values in order, axis label), one panel per value of
    panel = (name, values in order, title format)."""
    (x_col, x_values, x_label), (p_col, p_values, p_title) = x, panel
    methods = sorted(df["method"].unique())
    fig, axes = _panels(len(p_values))
    for ax, value in zip(axes, p_values, strict=True):
        g = df[df[p_col] == value]
        _errorbars(ax, g, x_col, {v: i for i, v in enumerate(x_values)}, methods)
        _floor(ax, g)
        ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
        ax.set(title=p_title.format(value), xlabel=x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final accuracy (held-out), mean ± std")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rounds_grid(df: pd.DataFrame, out: Path, *, order: Callable[[str], Any]) -> Path:
    """Held-out accuracy per round: rows = client counts, columns = partitionings, a mean line and ± std band per
    method, the majority class dashed. Where a run learned and then drifted, this is where it shows."""
    parts = sorted(df["partitioning"].unique(), key=order)
    counts = sorted(df["clients"].unique())
    methods = sorted(df["method"].unique())
    fig, axes = plt.subplots(
        len(counts), len(parts), figsize=(3.6 * len(parts) + 1, 2.9 * len(counts) + 0.6), sharey=True, squeeze=False
    )
    for i, clients in enumerate(counts):
        for k, part in enumerate(parts):
            ax = axes[i][k]
            g = df[(df["clients"] == clients) & (df["partitioning"] == part)]
            _floor(ax, g)
            for j, method in enumerate(methods):
                rows = g[g["method"] == method]
                if not len(rows):
                    continue
                curves = rows.iloc[0]["curves"]
                xs, mean, std = mean_std_band(curves)
                ax.plot(xs, mean, marker="o", ms=2.5, color=f"C{j % 10}", label=f"{method} (n={len(curves)})")
                ax.fill_between(xs, mean - std, mean + std, color=f"C{j % 10}", alpha=0.15)
            ax.set_title(f"{clients} clients · {part}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(counts) - 1:
                ax.set_xlabel("round")
            if k == 0:
                ax.set_ylabel("held-out accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle("Accuracy per round (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "accuracy_vs_round_study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
