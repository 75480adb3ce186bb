"""A clients × heterogeneity × methods study in `fl-report`: the tables and plots a reader can cite.

Runs that differ only in `seed` form a group (`simulations.seeds.group_seeds`). For every client count the
main table has the methods as rows and the partitionings as columns (IID, then Dirichlet α from large to
small, i.e. from mild to strong heterogeneity), each cell "mean ± sample std (n=…)" of the final held-out
accuracy. Labels are readable ("FFA-LoRA", "Dirichlet α=0.1"), never run folder names.

- **did not learn**: a run whose final accuracy is below the majority class's share of its evaluation
  split + 2 points. The share is computed from the run's own config (`majority_share`): the tweets' test
  split is drawn with the run's seed, so it differs slightly between seeds. A pivot cell notes how many of
  its runs did not learn.
- **pairs**: for every two methods in a column (same clients, same partitioning), the difference of their
  means and whether it exceeds the seeds' spread, taken as the sum of the two sample stds (the mean ± std
  intervals do not overlap). With n < 2 in either group there is no spread and no verdict.
- **best round**: a second pivot of the test accuracy at each run's validation-chosen round (the round with
  the best accuracy on the server's validation split, `data.val_size`, drawn from training data; never chosen on
  the test data). Runs without a validation split (those before it existed) have no best round. Beside the
  final it shows runs that learned and then drifted away (client drift under label skew).
- plots with ± std error bars: final accuracy vs partitioning (a panel per client count) and vs the number
  of clients (a panel per partitioning); accuracy per round, a panel per (clients, partitioning), a line and
  ± std band per method (``accuracy_vs_round_study.png``).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulations.seeds import group_seeds
from strategies import get_strategy

log = logging.getLogger(__name__)
DID_NOT_LEARN_MARGIN = 0.02  # final accuracy below majority share + 2 points
LAYOUT_KEYS = ("sim.num_clients", "sim.fraction_train", "data.partitioner", "data.alpha", "data.labels_per_client")


def method_label(flat: dict[str, Any]) -> str:
    """ "FedIT", "FFA-LoRA", "Fed-SB r=32 (sketch init)" … from a run's flat config."""
    fields = {k.removeprefix("strategy."): v for k, v in flat.items() if k.startswith("strategy.")}
    return get_strategy(str(fields.get("name"))).describe(fields)


def partition_label(flat: dict[str, Any]) -> str:
    """ "IID", "Dirichlet α=0.5", "pathological k=2" …"""
    kind = str(flat.get("data.partitioner"))
    if kind == "iid":
        return "IID"
    if kind == "dirichlet":
        return f"Dirichlet α={float(flat['data.alpha']):g}"
    if kind == "pathological":
        return f"pathological k={flat.get('data.labels_per_client')}"
    return kind


def _partition_order(label: str) -> tuple[int, float, str]:
    """IID first, then Dirichlet from large α to small (mild → strong heterogeneity), then the rest."""
    if label == "IID":
        return (0, 0.0, label)
    if label.startswith("Dirichlet α="):
        return (1, -float(label.split("=", 1)[1]), label)
    return (2, 0.0, label)


@lru_cache(maxsize=64)
def _majority(data_json: str, seed: int) -> float:
    from omegaconf import OmegaConf

    from fl.data import label_ids, load_pool, split_order

    data_cfg = OmegaConf.create(json.loads(data_json))
    ds = load_pool(data_cfg)
    labels, _ = label_ids(ds[data_cfg.label_column], data_cfg)
    test_idx, _ = split_order(len(labels), data_cfg, seed=seed)
    counts = np.bincount(labels[test_idx])
    return float(counts.max() / counts.sum())


@lru_cache(maxsize=16)
def _majority_words(cfg_json: str) -> float | None:
    """The largest class's share of a causal-LM run's scored held-out records, or None where the run scored no
    label words (free-text responses)."""
    from omegaconf import OmegaConf

    from fl.models import load_tokenizer
    from fl.tasks import get_task

    cfg = OmegaConf.create(json.loads(cfg_json))
    try:  # the split the run scored (prompts over max_length dropped) needs the run's tokenizer and data here
        tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
        test = get_task("causal_lm").build_data(cfg.data, tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir).test
    except OSError as e:  # a run folder copied to a machine without its model or data: the report goes on, unmarked
        log.warning("No majority floor for a %s run (no 'did not learn' mark): %s", cfg.model.name, e)
        return None
    if test.label_token_ids is None or not len(test):
        return None
    counts = np.bincount(test.labels.numpy())
    return float(counts.max() / counts.sum())


def majority_share(cfg: Any) -> float | None:
    """The largest class's share of the run's held-out split (what always predicting it scores).

    Classification runs, and causal-LM runs scored by label words (the tweets as instructions: the records the run
    scored, read from its on-disk data cache); None for free-text tasks, whose accuracy has no such floor.
    """
    from omegaconf import OmegaConf

    task = str(cfg.model.get("task", "seq_cls"))
    if task == "causal_lm":
        keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data")}
        return _majority_words(json.dumps({**keep, "seed": int(cfg.seed), "cache_dir": cfg.cache_dir}, default=str))
    if task != "seq_cls":
        return None
    return _majority(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True), int(cfg.seed))


def is_study(runs: list[dict[str, Any]]) -> bool:
    """Whether the runs vary the number of clients or the partitioning (a study's axes)."""
    return len({r["num_clients"] for r in runs}) > 1 or len({r["heterogeneity"] for r in runs}) > 1


def study_groups(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per group of seeds: method, clients, partitioning (readable), n, mean, std, did-not-learn count."""
    _, groups = group_seeds(runs)
    rows = []
    for g in groups:
        first = g["runs"][0]["_flat"]
        extra = {k: v for k, v in g["axis"].items() if k not in LAYOUT_KEYS and not k.startswith("data.min_")}
        method = method_label(first) + (" (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")" if extra else "")
        finals = [float(m["final_accuracy"]) for m in g["runs"]]
        # runs without a validation split have no validation-chosen round: NaN, never a round chosen on test data
        bests = [float(m["best_accuracy"]) if m.get("best_accuracy") is not None else float("nan") for m in g["runs"]]
        majorities = [m.get("majority") for m in g["runs"]]
        flops = [m.get("did_not_learn") for m in g["runs"]]
        rows.append(
            {
                "method": method,
                "clients": int(first["sim.num_clients"]),
                "partitioning": partition_label(first),
                "n": len(finals),
                "seeds": " ".join(str(m["seed"]) for m in sorted(g["runs"], key=lambda m: m["seed"])),
                "final_mean": float(np.mean(finals)),
                "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
                "best_mean": float(np.mean(bests)),
                "best_std": float(np.std(bests, ddof=1)) if len(bests) > 1 else float("nan"),
                "majority_mean": float(np.mean([v for v in majorities if v is not None]))
                if any(v is not None for v in majorities)
                else float("nan"),
                "majority_min": min((v for v in majorities if v is not None), default=float("nan")),
                "majority_max": max((v for v in majorities if v is not None), default=float("nan")),
                "did_not_learn": sum(bool(f) for f in flops),
                "curves": [[float(r["accuracy"]) for r in m.get("_rows", [])] for m in g["runs"]],
            }
        )
    df = pd.DataFrame(rows)
    df["_order"] = df["partitioning"].map(_partition_order)
    return df.sort_values(["clients", "_order", "method"]).drop(columns="_order").reset_index(drop=True)


def _cell(row: pd.Series, value: str = "final") -> str:
    mean, std = row[f"{value}_mean"], row[f"{value}_std"]
    text = f"{mean:.3f}" + ("" if std != std else f" ± {std:.3f}") + f" (n={row.n})"
    if value == "final" and row.did_not_learn:
        text += f" — did not learn ({row.did_not_learn}/{row.n})"
    return text


def pivots(df: pd.DataFrame, value: str = "final") -> dict[int, pd.DataFrame]:
    """Per client count: methods as rows, partitionings as columns (mild → strong), "mean ± std (n)" cells.

    ``value`` is "final" (the headline: the last round on the whole held-out split) or "best" (the best round).
    """
    columns = sorted(df["partitioning"].unique(), key=_partition_order)
    out = {}
    for clients, g in df.groupby("clients"):
        cells = g.apply(lambda row: _cell(row, value), axis=1)
        table = g.assign(cell=cells).pivot(index="method", columns="partitioning", values="cell")
        table = table.reindex(columns=[c for c in columns if c in table.columns]).fillna("—")
        table.columns.name = None
        out[int(clients)] = table.reset_index()
    return out


def pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Every two methods in a column: difference of means (points) and whether it exceeds std_a + std_b."""
    rows = []
    for (clients, part), g in df.groupby(["clients", "partitioning"]):
        for a, b in combinations(g.sort_values("final_mean", ascending=False).itertuples(index=False), 2):
            spread = a.final_std + b.final_std
            known = a.n >= 2 and b.n >= 2 and spread == spread
            diff = 100 * (a.final_mean - b.final_mean)
            rows.append(
                {
                    "clients": int(clients),
                    "partitioning": part,
                    "higher": a.method,
                    "lower": b.method,
                    "difference (points)": round(diff, 1),
                    "spread (points, std + std)": round(100 * spread, 1) if known else float("nan"),
                    "exceeds the spread": ("yes" if diff > 100 * spread else "no") if known else "n < 2",
                }
            )
    out = pd.DataFrame(rows)
    if len(out):
        out = out.assign(_o=out["partitioning"].map(_partition_order)).sort_values(["clients", "_o"])
        out = out.drop(columns="_o").reset_index(drop=True)
    return out


def study_markdown(df: pd.DataFrame, *, markdown: Any) -> str:
    """The study's section of report.md: a pivot per client count, the pairs, how to read them."""
    low, high = df["majority_min"].min(), df["majority_max"].max()
    floor = (
        f"majority class's share of its held-out split ({low:.3f}–{high:.3f}, by seed)"
        if low == low
        else "no majority-class floor (not a classification task)"
    )
    parts = [
        "## Final held-out accuracy: methods × partitioning, per number of clients\n\n"
        f'Mean ± sample std over seeds (n runs). "did not learn": the run ended below the {floor} '
        f"+ {100 * DID_NOT_LEARN_MARGIN:.0f} points.\n"
    ]
    for clients, table in pivots(df).items():
        parts.append(f"\n### {clients} clients\n\n" + markdown(table))
    pair_table = pairs(df)
    if len(pair_table):
        parts.append(
            "\n## Which differences exceed the seeds' spread\n\n"
            "For each two methods in a column: the difference of their mean final accuracies and whether it is "
            "larger than the sum of their sample stds (their mean ± std intervals do not overlap).\n\n"
            + markdown(pair_table)
        )
    if df["best_mean"].notna().any():
        parts.append(
            "\n## Best round's accuracy (optimistic: for reading drift, not for ranking)\n\n"
            "Mean ± sample std over seeds of each run's best evaluated round: the per-round evaluations on the "
            "seeded held-out subset and the last round's on the whole split. A maximum over noisy evaluations, "
            "chosen on the test data, so it flatters every run; where it stands far above the final accuracy "
            "the run learned and then drifted away.\n"
        )
        for clients, table in pivots(df, "best").items():
            parts.append(f"\n### {clients} clients, best round\n\n" + markdown(table))
    return "".join(parts)


def labelled_groups(runs: list[dict[str, Any]], name: str | None = None) -> pd.DataFrame:
    """`study_groups` with " · name" after each method: a study's rows beside another's in one pivot."""
    df = study_groups(runs)
    return df if name is None else df.assign(method=df["method"] + f" · {name}")


def study_report(
    runs: list[dict[str, Any]],
    root: Path,
    *,
    markdown: Any,
    name: str | None = None,
    beside: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[str, list[Path]]:
    """Write study.csv, pivot_<n>_clients.csv, pairs.csv and the error-bar plots; returns (markdown, plots).

    ``beside`` maps a name to another study's runs (e.g. the study a rescue reruns with another recipe): each
    study is grouped on its own (its recipe's keys never enter the method labels), its rows named
    "FedIT · <name>", and the pivots, pairs and plots show both, so each cell reads against its twin.
    """
    from simulations.study_plots import plot_rounds_grid, plot_vs_clients, plot_vs_partitioning

    df = labelled_groups(runs, name if beside else None)
    if beside:
        df = pd.concat([df, *(labelled_groups(other, key) for key, other in beside.items())], ignore_index=True)
        df["_order"] = df["partitioning"].map(_partition_order)
        df = df.sort_values(["clients", "_order", "method"]).drop(columns="_order").reset_index(drop=True)
    df.drop(columns="curves").to_csv(root / "study.csv", index=False)
    for clients, table in pivots(df).items():
        table.to_csv(root / f"pivot_{clients}_clients.csv", index=False)
    for clients, table in pivots(df, "best").items():
        table.to_csv(root / f"pivot_best_{clients}_clients.csv", index=False)
    pairs(df).to_csv(root / "pairs.csv", index=False)
    plots = []
    if df["partitioning"].nunique() > 1:
        plots.append(plot_vs_partitioning(df, root, order=_partition_order))
    if df["clients"].nunique() > 1:
        plots.append(plot_vs_clients(df, root, order=_partition_order))
    if any(len(c) > 1 for curves in df["curves"] for c in curves):
        plots.append(plot_rounds_grid(df, root, order=_partition_order))
    return study_markdown(df, markdown=markdown), plots
