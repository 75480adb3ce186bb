"""The privacy–utility map's report (simulations/bench_dp_map.py runs the cells): a cell's privacy figures, the
table and the plot.

One JSON line per finished cell is the input; a DP cell is matched with its non-DP twin(s) by variant, method,
clients, local steps or epochs and seed. Kept apart from the runner so the report can be read and tested alone.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

HEADLINE_EPSILON = 3.0
OWN_RATE = "own-rate"  # the variant of a non-DP twin at the method's own (non-DP) learning rate


def plan_figures(plan_file: Path) -> dict[str, Any]:
    """σ and RDP order of a DP cell's plan (client 0's: the partitions are near equal), the ε PRV accounting gives at
    that σ, and the σ PRV would plan for the same target; empty for a non-DP cell (no privacy_plan.json)."""
    if not plan_file.is_file():
        return {}
    from privacy import plan_dp
    from privacy.orders import prv_epsilon

    plan = json.loads(plan_file.read_text())[0]
    if plan.get("eps_error") is not None:  # a PRV-planned cell: its σ is PRV's, RDP's is recorded beside it
        return {
            "sigma": plan["rdp_noise_multiplier"],
            "rdp_order": plan.get("rdp_order"),
            "examples_per_client": plan["num_examples"],
            "prv_epsilon_at_rdp_sigma": None,
            "prv_sigma": plan["noise_multiplier"],
        }
    history = [(plan["noise_multiplier"], plan["sample_rate"], plan["dp_steps"])]
    if plan["init_steps"]:
        history.insert(0, (plan["init_noise_multiplier"], 1.0, plan["init_steps"]))
    prv_sigma = plan_dp(
        **{k: plan[k] for k in ("target_epsilon", "delta", "num_examples", "steps_per_round", "planned_rounds")},
        batch_size=plan["batch_size"],
        max_grad_norm=plan["max_grad_norm"],
        accountant="prv",
        init_steps=plan["init_steps"],
        init_share=plan["init_share"],
    ).noise_multiplier
    return {
        "sigma": plan["noise_multiplier"],
        "rdp_order": plan["rdp_order"],
        "examples_per_client": plan["num_examples"],
        "prv_epsilon_at_rdp_sigma": prv_epsilon(history, plan["delta"]),
        "prv_sigma": prv_sigma,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each DP cell with its twin's accuracy, the gap, σ (RDP and PRV), DP steps and wall time."""

    def twin_key(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(r.get(k) for k in ("variant", "method", "clients", "local_steps", "local_epochs", "seed"))

    def steps(r: dict[str, Any]) -> int:
        return int(r.get("dp_steps_taken") or r.get("dp_steps") or 0)

    twins = {twin_key(r): r for r in rows if r["epsilon"] is None}
    own = {twin_key(r)[1:]: r for r in rows if r["epsilon"] is None and r.get("variant") == OWN_RATE}
    lines = [
        "| method | clients | DP steps | ε | accuracy | non-DP twin | twin at own rate | gap | σ (RDP) | σ (PRV) "
        "| wall s (DP / twin) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r["epsilon"] is not None),
        key=lambda r: (r.get("variant") or "", r["method"], r["clients"], steps(r)),
    ):
        twin = twins.get(twin_key(r))
        own_twin = own.get(twin_key(r)[1:]) if not r.get("variant") else None
        found = [t["accuracy"] for t in (twin, own_twin) if t]
        acc_t = f"{100 * twin['accuracy']:.1f}" if twin else "—"
        acc_o = f"{100 * own_twin['accuracy']:.1f}" if own_twin else "—"
        gap = f"{100 * (max(found) - r['accuracy']):.1f}" if found else "—"  # to the better twin
        wall_t = f"{twin['wall_s']:.0f}" if twin else "—"
        name = f"{r['method']} ({r['variant']})" if r.get("variant") else r["method"]
        lines.append(
            f"| {name} | {r['clients']} | {steps(r)} | {r['epsilon']:g} | "
            f"{100 * r['accuracy']:.1f} | {acc_t} | {acc_o} | {gap} | {r.get('sigma', float('nan')):.3f} | "
            f"{r.get('prv_sigma', float('nan')):.3f} | {r['wall_s']:.0f} / {wall_t} |"
        )
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    """``m ± s`` in percent (sample std, n − 1), or the one value when there is one."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """Markdown over seeds: each DP setting (variant, method, clients, DP steps, ε) with its accuracy and its twins'
    as mean ± std over the seeds run, the gap of the means, and which seeds each side has.

    The gap is taken over the seeds that have both a DP cell and a twin (a seed whose twin has not run yet is
    listed but not in the gap), so a half-finished second seed never compares unlike runs.
    """

    def setting(r: dict[str, Any]) -> tuple[str, ...]:
        keys = ("variant", "method", "clients", "rounds", "local_steps", "local_epochs")
        return tuple("" if r.get(k) is None else str(r[k]) for k in keys)

    twins = {(setting(r), r["seed"]): r["accuracy"] for r in rows if r["epsilon"] is None}
    groups: dict[tuple[tuple[str, ...], float], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["epsilon"] is not None:
            groups.setdefault((setting(r), float(r["epsilon"])), {})[int(r["seed"])] = r
    lines = [
        "| method | clients | DP steps | ε | accuracy (mean ± std) | seeds | non-DP twin | twin seeds | gap (paired) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def order(item: tuple[tuple[tuple[str, ...], float], dict[int, dict[str, Any]]]) -> tuple[Any, ...]:
        (key, eps), dp = item
        first = dp[min(dp)]
        return (*key[:2], int(first["clients"]), float(first.get("dp_steps") or 0), key[5], eps)

    for (key, eps), dp in sorted(groups.items(), key=order):
        tw = {seed: twins[(key, seed)] for seed in sorted(dp) if (key, seed) in twins}
        gap = (
            f"{100 * (statistics.mean(tw.values()) - statistics.mean(dp[s]['accuracy'] for s in tw)):.1f}"
            if tw
            else "—"
        )
        first = dp[min(dp)]
        name = f"{first['method']} ({first['variant']})" if first.get("variant") else first["method"]
        taken = first.get("dp_steps_taken") or first.get("dp_steps")
        steps = f"{taken:.0f}" if taken else "—"
        lines.append(
            f"| {name} | {first['clients']} | {steps} | {eps:g} | {_mean_std([dp[s]['accuracy'] for s in sorted(dp)])} "
            f"| {','.join(map(str, sorted(dp)))} | {_mean_std(list(tw.values())) if tw else '—'} "
            f"| {','.join(map(str, tw)) or '—'} | {gap} |"
        )
    return "\n".join(lines)


def line_label(row: dict[str, Any]) -> str:
    """A plot line's name: the method, and the rate where a variant set one (an own-rate twin and an ``--lr`` cell
    at the same rate share a line)."""
    rates = [x.split("=", 1)[1] for x in row.get("extra") or () if x.startswith("strategy.lr=")]
    return f"{row['method']}, lr {rates[-1]}" if row.get("variant") and rates else row["method"]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy at ε = 3 vs DP steps per client, one colour per method (and rate) and client count; solid with
    DP, dashed the non-DP twins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups: dict[tuple[str, int], dict[float | None, list[tuple[int, float]]]] = {}
    for r in rows:  # the grid's cells and its rate variants (the paper regime has epochs, not planned steps)
        if r["epsilon"] in (HEADLINE_EPSILON, None) and r["seed"] == 0 and r.get("dp_steps"):
            arms = groups.setdefault((line_label(r), r["clients"]), {})
            arms.setdefault(r["epsilon"], []).append((r["dp_steps"], 100 * r["accuracy"]))
    for i, ((name, clients), arms) in enumerate(sorted(groups.items())):
        for eps, style in ((HEADLINE_EPSILON, "-o"), (None, "--x")):
            if eps in arms:
                xs, ys = zip(*sorted(arms[eps]), strict=True)
                label = f"{name}, {clients} clients" + (", ε = 3" if eps else ", no DP")
                ax.plot(xs, ys, style, color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("DP steps per client")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs DP steps per client (solid: ε = 3, dashed: no DP)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
