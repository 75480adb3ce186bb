"""Compare the federated LoRA methods on the default model and data, in one run of this script.

Usage::

    bash dev.sh python -m simulations.bench_methods [--rounds 5] [--local-steps 10] [--out docs/methods]
    # the seeded comparison: every method, 10 rounds, 3 seeds (~6-7 h on 2 cores for the five methods)
    python -m simulations.bench_methods --rounds 10 --local-steps 20 --seeds 0 1 2 --out docs/methods_seeds
    python -m simulations.bench_methods --five-methods ...   # FedIT, FFA-LoRA, LoRA-FAIR (closed form), Fed-SB, FedEx

Every method runs the same federation (10 clients, Dirichlet α=0.5, equal rounds and local steps,
every client every round). The client learning rate is tuned per client-training family with the
same budget for each: a grid of two values on the full benchmark run with the first seed, best final
accuracy kept (`--no-tune`: the rates tuned in BENCHMARKS.md). LoRA-FAIR and FedEx-LoRA train clients
exactly as FedIT does, so they use FedIT's tuned rate; the second Fed-SB rank uses the first rank's.
Then every method runs at its rate for every seed; the table gives final accuracy as mean ± sample std
over seeds. Writes `<out>.md` (the table) and `<out>.json` (every run's metrics). The same grid as a
sweep (one run folder per cell, resumable, `fl-report` pivot): `fl-sweep sweep=methods_seeds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simulations import harness

GRIDS: dict[str, list[float]] = {  # client learning rates (AdamW) per training family
    "fedit": [1e-3, 3e-3],
    "ffa_lora": [3e-3, 1e-2],
    "fed_sb": [3e-3, 1e-2],
}
TUNED: dict[str, float] = {"fedit": 3e-3, "ffa_lora": 1e-2, "fed_sb": 1e-2}  # BENCHMARKS.md, 5 rounds x 10 steps
METHODS: list[tuple[str, str, list[str], str]] = [  # (label, strategy, extra overrides, lr family)
    ("FedIT r=8", "fedit", ["strategy.rank=8"], "fedit"),
    ("FFA-LoRA r=8", "ffa_lora", ["strategy.rank=8"], "ffa_lora"),
    ("LoRA-FAIR r=8 (sgd)", "lora_fair", ["strategy.rank=8", "strategy.solver=sgd"], "fedit"),
    ("LoRA-FAIR r=8 (closed form)", "lora_fair", ["strategy.rank=8", "strategy.solver=closed_form"], "fedit"),
    ("Fed-SB r=32", "fed_sb", ["strategy.rank=32"], "fed_sb"),
    ("Fed-SB r=64", "fed_sb", ["strategy.rank=64"], "fed_sb"),
    ("FedEx-LoRA r=8", "fedex_lora", ["strategy.rank=8"], "fedit"),
]
FIVE_METHODS = ["FedIT r=8", "FFA-LoRA r=8", "LoRA-FAIR r=8 (closed form)", "Fed-SB r=32", "FedEx-LoRA r=8"]


def run_one(strategy: str, extra: list[str], lr: float, common: list[str], *, seed: int = 0) -> dict[str, Any]:
    """One method at one rate and seed: its metrics rows and wall seconds."""
    overrides = [f"strategy={strategy}", *extra, f"strategy.lr={lr}", *common, f"seed={seed}"]
    run = harness.simulate(overrides, prefix=f"bench-{strategy}-")
    return {"strategy": strategy, "extra": extra, "lr": lr, "seed": seed, "wall": run.wall_s, "rows": run.rows}


def summarise(label: str, runs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """One method over its seeds: final accuracy mean ± sample std; bytes, residual, times of the first seed."""
    run = runs[0]
    rows = run["rows"]
    last = rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    finals = [r["rows"][-1]["accuracy"] for r in runs]
    mean, std = harness.mean_std(finals)
    return {
        "method": label,
        "lr": run["lr"],
        "seeds": [r["seed"] for r in runs],
        "final_accs": finals,
        "final_acc": mean,
        "final_std": std,
        "per_round_acc": [round(r["accuracy"], 4) for r in rows],
        "cum_up_MB": last["cum_bytes_up"] / 1e6,
        "cum_down_MB": last["cum_bytes_down"] / 1e6,
        "up_floats_per_client_round": trained[-1]["floats_up"] / clients,
        "residual_last": last.get("residual"),
        "residual_before_last": last.get("residual_before"),
        "residual_max": max(r["residual"] for r in trained if r.get("residual") is not None),
        "agg_seconds_mean": sum(r["aggregate_seconds"] for r in trained) / len(trained),
        "solve_seconds_mean": (
            sum(r.get("solve_seconds", 0.0) for r in trained) / len(trained) if "solve_seconds" in last else None
        ),
        "wall_s": sum(r["wall"] for r in runs) / len(runs),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per method."""
    head = [
        "method",
        "lr",
        "final acc (mean ± std, n)",
        "acc per round, seed 0 (0..R)",
        "cum up MB",
        "cum down MB",
        "up floats/client/round",
        "residual (last round; before→after for FAIR, FedEx)",
        "server agg s/round",
        "wall s",
    ]
    lines = []
    for r in rows:
        res = r["residual_last"]
        res_s = "n/a" if res is None else f"{res:.2e}"
        if r["residual_before_last"] is not None:
            res_s = f"{r['residual_before_last']:.3f} → {res:.2g}"
        n = len(r["final_accs"])
        acc = f"{r['final_acc']:.4f}" + (f" ± {r['final_std']:.4f}" if n > 1 else "") + f" (n={n})"
        lines.append(
            [
                r["method"],
                f"{r['lr']:g}",
                acc,
                " ".join(f"{a:.3f}" for a in r["per_round_acc"]),
                f"{r['cum_up_MB']:.1f}",
                f"{r['cum_down_MB']:.1f}",
                f"{r['up_floats_per_client_round']:,.0f}",
                res_s,
                f"{r['agg_seconds_mean']:.3f}",
                f"{r['wall_s']:.0f}",
            ]
        )
    return harness.md_table(head, lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Tune each family's rate, run every method at it for every seed, write `<out>.md` and `<out>.json`."""
    ap = harness.parser(__doc__)
    harness.add_federation(ap, rounds=5, local_steps=10, clients=10, test_size=2000)
    harness.add_seeds(ap)
    ap.add_argument("--methods", nargs="+", default=None, help=f"labels (default all): {[m[0] for m in METHODS]}")
    ap.add_argument("--five-methods", action="store_true", help=f"the five methods {FIVE_METHODS}")
    ap.add_argument("--no-tune", action="store_true", help=f"use the tuned rates {TUNED} instead of the grids")
    harness.add_extra(ap)
    ap.add_argument("--out", default="docs/methods")
    args = harness.parse(ap, argv)
    wanted = FIVE_METHODS if args.five_methods else args.methods or [m[0] for m in METHODS]
    methods = [m for m in METHODS if m[0] in wanted]
    if len(methods) != len(wanted):
        raise SystemExit(f"Unknown method label in {wanted}; labels: {[m[0] for m in METHODS]}")
    common = harness.federation(args)  # the recorded figures: constant rate, fp32 (--extra overrides)
    seed0 = args.seeds[0]
    runs: dict[tuple[str, float, str, int], dict[str, Any]] = {}
    best_lr: dict[str, float] = {}
    families = {m[3] for m in methods}
    first_of_family = {fam: next(m for m in methods if m[3] == fam) for fam in families}
    for fam in sorted(families):  # tuning: the family's first method over its grid, first seed
        _, strategy, extra, _ = first_of_family[fam]
        if args.no_tune:
            best_lr[fam] = TUNED[fam]
            continue
        for lr in GRIDS[fam]:
            key = (strategy, lr, " ".join(extra), seed0)
            runs[key] = run_one(strategy, extra, lr, common, seed=seed0)
            print(f"tuned {strategy} {extra} lr={lr}: {runs[key]['rows'][-1]['accuracy']:.4f}", flush=True)
        best_lr[fam] = max(
            GRIDS[fam], key=lambda lr: runs[(strategy, lr, " ".join(extra), seed0)]["rows"][-1]["accuracy"]
        )
    results = []
    for label, strategy, extra, fam in methods:
        per_seed = []
        for seed in args.seeds:
            key = (strategy, best_lr[fam], " ".join(extra), seed)
            if key not in runs:
                runs[key] = run_one(strategy, extra, best_lr[fam], common, seed=seed)
                print(f"{label} seed={seed}: {runs[key]['rows'][-1]['accuracy']:.4f}", flush=True)
            per_seed.append(runs[key])
        results.append(summarise(label, per_seed, args.clients))
    md = table(results)
    print(md)
    grids = "tuned rates " + str(TUNED) if args.no_tune else f"lr grids {GRIDS}"
    harness.write_report(
        args.out,
        markdown=f"Config: {' '.join(common)}; seeds {args.seeds}; {grids}; best lr per family {best_lr}.\n\n" + md,
        data={
            "common": common,
            "seeds": args.seeds,
            "grids": GRIDS,
            "tuned": args.no_tune,
            "best_lr": best_lr,
            "results": results,
            "runs": [
                {"strategy": k[0], "lr": k[1], "extra": k[2], "seed": k[3], "final_acc": v["rows"][-1]["accuracy"]}
                for k, v in runs.items()
            ],
        },
    )


if __name__ == "__main__":
    main()
