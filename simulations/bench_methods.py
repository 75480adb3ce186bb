"""Compare the federated LoRA methods on the default model and data, in one run of this script.

Usage::

    bash dev.sh python -m simulations.bench_methods [--rounds 5] [--local-steps 10] [--out docs/methods]

Every method runs the same federation (10 clients, Dirichlet α=0.5, equal rounds and local steps,
every client every round). The client learning rate is tuned per client-training family with the
same budget for each: a grid of two values on the full benchmark run, best final accuracy kept.
LoRA-FAIR trains clients exactly as FedIT does, so it uses FedIT's tuned rate; the second Fed-SB rank
uses the first rank's. Writes `<out>.md` (the table) and `<out>.json` (every run's metrics).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env

GRIDS: dict[str, list[float]] = {  # client learning rates (AdamW) per training family
    "fedit": [1e-3, 3e-3],
    "ffa_lora": [3e-3, 1e-2],
    "fed_sb": [3e-3, 1e-2],
}
METHODS: list[tuple[str, str, list[str], str]] = [  # (label, strategy, extra overrides, lr family)
    ("FedIT r=8", "fedit", ["strategy.rank=8"], "fedit"),
    ("FFA-LoRA r=8", "ffa_lora", ["strategy.rank=8"], "ffa_lora"),
    ("LoRA-FAIR r=8 (sgd)", "lora_fair", ["strategy.rank=8", "strategy.solver=sgd"], "fedit"),
    ("LoRA-FAIR r=8 (closed form)", "lora_fair", ["strategy.rank=8", "strategy.solver=closed_form"], "fedit"),
    ("Fed-SB r=32", "fed_sb", ["strategy.rank=32"], "fed_sb"),
    ("Fed-SB r=64", "fed_sb", ["strategy.rank=64"], "fed_sb"),
]


def run_one(strategy: str, extra: list[str], lr: float, common: list[str]) -> dict[str, Any]:
    from fl.simulation import run_simulation

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{strategy}-")) / "run"
    t0 = time.perf_counter()
    run_simulation([f"strategy={strategy}", *extra, f"strategy.lr={lr}", *common, f"run_dir={run_dir}"])
    rows = read_metrics(run_dir)
    return {"strategy": strategy, "extra": extra, "lr": lr, "wall": time.perf_counter() - t0, "rows": rows}


def summarise(label: str, run: dict[str, Any], clients: int) -> dict[str, Any]:
    rows = run["rows"]
    last = rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "method": label,
        "lr": run["lr"],
        "final_acc": last["accuracy"],
        "per_round_acc": [round(r["accuracy"], 4) for r in rows],
        "cum_up_MB": last["cum_bytes_up"] / 1e6,
        "cum_down_MB": last["cum_bytes_down"] / 1e6,
        "up_floats_per_client_round": trained[-1]["floats_up"] / clients,
        "residual_last": last.get("residual"),
        "residual_before_last": last.get("residual_before"),
        "agg_seconds_mean": sum(r["aggregate_seconds"] for r in trained) / len(trained),
        "solve_seconds_mean": (
            sum(r.get("solve_seconds", 0.0) for r in trained) / len(trained) if "solve_seconds" in last else None
        ),
        "wall_s": run["wall"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | lr | final acc | acc per round (0..R) | cum up MB | cum down MB | up floats/client/round "
        "| residual (last round; before→after for FAIR) | server agg s/round | wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        res = r["residual_last"]
        res_s = "n/a" if res is None else f"{res:.2e}"
        if r["residual_before_last"] is not None:
            res_s = f"{r['residual_before_last']:.3f} → {res:.3f}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['final_acc']:.4f} | {' '.join(f'{a:.3f}' for a in r['per_round_acc'])}"
            f" | {r['cum_up_MB']:.1f} | {r['cum_down_MB']:.1f} | {r['up_floats_per_client_round']:,.0f} | {res_s}"
            f" | {r['agg_seconds_mean']:.3f} | {r['wall_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--out", default="docs/methods")
    args = ap.parse_args()
    common = [
        f"sim.num_clients={args.clients}",
        f"sim.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        "data.partitioner=dirichlet",
        "data.alpha=0.5",
        f"data.test_size={args.test_size}",
    ]
    runs: dict[tuple[str, float, str], dict[str, Any]] = {}
    best_lr: dict[str, float] = {}
    first_of_family = {fam: next(m for m in METHODS if m[3] == fam) for fam in GRIDS}
    for fam, grid in GRIDS.items():  # tuning: the family's first method over its grid
        _, strategy, extra, _ = first_of_family[fam]
        for lr in grid:
            runs[(strategy, lr, " ".join(extra))] = run_one(strategy, extra, lr, common)
            print(
                f"tuned {strategy} {extra} lr={lr}: {runs[(strategy, lr, ' '.join(extra))]['rows'][-1]['accuracy']:.4f}"
            )
        best_lr[fam] = max(grid, key=lambda lr: runs[(strategy, lr, " ".join(extra))]["rows"][-1]["accuracy"])
    results = []
    for label, strategy, extra, fam in METHODS:
        key = (strategy, best_lr[fam], " ".join(extra))
        if key not in runs:
            runs[key] = run_one(strategy, extra, best_lr[fam], common)
        results.append(summarise(label, runs[key], args.clients))
    md = table(results)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"Config: {' '.join(common)}; lr grids {GRIDS}; best lr per family {best_lr}.\n\n" + md
    )
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "common": common,
                "grids": GRIDS,
                "best_lr": best_lr,
                "results": results,
                "tuning": [
                    {"strategy": k[0], "lr": k[1], "extra": k[2], "final_acc": v["rows"][-1]["accuracy"]}
                    for k, v in runs.items()
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
