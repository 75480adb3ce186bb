"""The privacy–utility map (issue 27): accuracy at ε = 3 and without DP over clients × DP steps per client.

Grid: methods (FFA-LoRA, FedIT, Fed-SB, each with its ``privacy=dp_<method>`` preset) × clients {3, 10} (≈12k and
≈3.6k tweets each) × DP steps per client {≈9, ≈50, ≈150} (``privacy.local_steps`` × rounds, the budget planned
for every round) at ε = 3, each with its non-DP twin at the same logical batch and steps; then ε ∈ {1, 8} at the
best ε = 3 cell of each method. Every finished cell is one JSON line in ``--out``; a second invocation skips the
cells already there, so the map survives being stopped (resumable). ``--report`` prints the table (accuracy, its
twin, the gap, σ, DP steps, wall time; PRV's ε and σ beside RDP's) and writes the plot.

Usage::

    python -m simulations.bench_dp_map --out runs/dp_map.jsonl            # the MiniLM map (hours on 2 cores)
    python -m simulations.bench_dp_map --tiny --out /tmp/map.jsonl        # smoke test on the tiny model
    python -m simulations.bench_dp_map --out runs/dp_map.jsonl --report   # table + plot of what has finished
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env

METHODS = ("ffa_lora", "fedit", "fed_sb")
CLIENTS = (3, 10)
LOCAL_STEPS = (3, 17, 50)  # × ROUNDS = 9, 51, 150 DP steps per client
ROUNDS = 3
HEADLINE_EPSILON = 3.0
OTHER_EPSILONS = (1.0, 8.0)
LOGICAL_BATCH = 256  # the presets' logical batch
PHYSICAL_BATCH = 64

TINY = [
    "model=tiny",
    "data.max_examples=600",
    "data.test_size=100",
    "data.max_length=32",
    "train.eval_batch_size=64",
    "train.precision=fp32",
]


@dataclass(frozen=True)
class Cell:
    """One run of the map: a method, a client count, local steps per round, and ε (None: the non-DP twin)."""

    method: str
    clients: int
    local_steps: int
    epsilon: float | None
    rounds: int = ROUNDS
    seed: int = 0

    @property
    def key(self) -> str:
        eps = "off" if self.epsilon is None else f"eps{self.epsilon:g}"
        return f"{self.method}-c{self.clients}-s{self.local_steps}x{self.rounds}-{eps}-seed{self.seed}"

    @property
    def dp_steps(self) -> int:
        return self.local_steps * self.rounds

    def overrides(self, *, batch: int, physical: int) -> list[str]:
        """The Hydra overrides of this cell: the method's DP preset, with DP off for the twin."""
        common = [
            f"strategy={self.method}",
            f"privacy=dp_{self.method}",
            f"sim.num_clients={self.clients}",
            f"sim.rounds={self.rounds}",
            "sim.fraction_train=1.0",
            f"seed={self.seed}",
        ]
        if self.epsilon is None:  # same logical batch and steps, no clipping or noise
            return [
                *common,
                "privacy.enabled=false",
                f"train.batch_size={batch}",
                f"train.local_steps={self.local_steps}",
            ]
        return [
            *common,
            f"privacy.target_epsilon={self.epsilon:g}",
            f"privacy.batch_size={batch}",
            f"privacy.physical_batch={physical}",
            f"privacy.local_steps={self.local_steps}",
            f"privacy.planned_rounds={self.rounds}",
        ]


def grid(
    methods: Iterable[str] = METHODS,
    clients: Iterable[int] = CLIENTS,
    local_steps: Iterable[int] = LOCAL_STEPS,
    *,
    rounds: int = ROUNDS,
    seeds: Iterable[int] = (0,),
) -> list[Cell]:
    """The ε = 3 cells and their non-DP twins."""
    return [
        Cell(m, c, s, e, rounds, seed)
        for m in methods
        for c in clients
        for s in local_steps
        for seed in seeds
        for e in (HEADLINE_EPSILON, None)
    ]


def best_cells(done: Iterable[dict[str, Any]]) -> list[Cell]:
    """ε ∈ {1, 8} at each method's best ε = 3 cell (by final accuracy) among finished rows."""
    best: dict[str, dict[str, Any]] = {}
    for row in done:
        if row["epsilon"] == HEADLINE_EPSILON and row["accuracy"] > best.get(row["method"], {}).get("accuracy", -1):
            best[row["method"]] = row
    return [
        Cell(r["method"], r["clients"], r["local_steps"], e, r["rounds"], r["seed"])
        for r in best.values()
        for e in OTHER_EPSILONS
    ]


def read_done(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


Runner = Callable[[Cell, list[str]], dict[str, Any]]


def simulate(cell: Cell, overrides: list[str]) -> dict[str, Any]:
    """Run one cell as a simulation; its final accuracy, ε, σ and DP steps (from the run's own files)."""
    from fl.app.simulation import run_simulation
    from privacy import plan_dp
    from privacy.orders import prv_epsilon

    run_dir = Path(tempfile.mkdtemp(prefix=f"dp-map-{cell.key}-")) / "run"
    t0 = time.perf_counter()
    run_simulation([*overrides, f"run_dir={run_dir}"])
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    out: dict[str, Any] = {"accuracy": rows[-1]["accuracy"], "wall_s": wall, "run_dir": str(run_dir)}
    out["epsilon_max"] = max((r.get("epsilon_max") or 0.0) for r in rows)
    out["dp_steps_taken"] = max((r.get("dp_steps_max") or 0) for r in rows)
    plan_file = run_dir / "privacy_plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())[0]  # client 0 (the partitions are near equal here)
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
        out.update(
            sigma=plan["noise_multiplier"],
            rdp_order=plan["rdp_order"],
            examples_per_client=plan["num_examples"],
            prv_epsilon_at_rdp_sigma=prv_epsilon(history, plan["delta"]),
            prv_sigma=prv_sigma,
        )
    return out


def run_map(cells: Iterable[Cell], out: Path, *, runner: Runner, batch: int, physical: int) -> list[dict[str, Any]]:
    """Run the cells not yet in `out`, appending one JSON line per finished cell; returns every row."""
    done = read_done(out)
    keys = {row["key"] for row in done}
    out.parent.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        if cell.key in keys:
            continue
        result = runner(cell, cell.overrides(batch=batch, physical=physical))
        row = {"key": cell.key, **asdict(cell), "dp_steps": cell.dp_steps, **result}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        keys.add(cell.key)
        print(json.dumps(row), flush=True)
    return done


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each DP cell with its twin's accuracy, the gap, σ (RDP and PRV), DP steps and wall time."""
    twins = {(r["method"], r["clients"], r["local_steps"], r["seed"]): r for r in rows if r["epsilon"] is None}
    lines = [
        "| method | clients | DP steps | ε | accuracy | non-DP twin | gap | σ (RDP) | σ (PRV) | wall s (DP / twin) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r["epsilon"] is not None), key=lambda r: (r["method"], r["clients"], r["dp_steps"])
    ):
        twin = twins.get((r["method"], r["clients"], r["local_steps"], r["seed"]))
        acc_t = f"{100 * twin['accuracy']:.1f}" if twin else "—"
        gap = f"{100 * (twin['accuracy'] - r['accuracy']):.1f}" if twin else "—"
        wall_t = f"{twin['wall_s']:.0f}" if twin else "—"
        lines.append(
            f"| {r['method']} | {r['clients']} | {r.get('dp_steps_taken') or r['dp_steps']} | {r['epsilon']:g} | "
            f"{100 * r['accuracy']:.1f} | {acc_t} | {gap} | {r.get('sigma', float('nan')):.3f} | "
            f"{r.get('prv_sigma', float('nan')):.3f} | {r['wall_s']:.0f} / {wall_t} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy at ε = 3 vs DP steps per client, one line per method and client count (dashed: non-DP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eps, style in ((HEADLINE_EPSILON, "-o"), (None, "--x")):
        groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["epsilon"] == eps and r["seed"] == 0:
                groups.setdefault((r["method"], r["clients"]), []).append((r["dp_steps"], 100 * r["accuracy"]))
        for (method, clients), pts in sorted(groups.items()):
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(xs, ys, style, label=f"{method}, {clients} clients" + (" (no DP)" if eps is None else ""))
    ax.set_xscale("log")
    ax.set_xlabel("DP steps per client")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy at ε = 3 vs DP steps per client")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="results, one JSON line per finished cell")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    ap.add_argument("--local-steps", type=int, nargs="*", default=list(LOCAL_STEPS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--batch", type=int, default=LOGICAL_BATCH)
    ap.add_argument("--physical-batch", type=int, default=PHYSICAL_BATCH)
    ap.add_argument("--tiny", action="store_true", help="smoke test on the tiny model (TINY overrides)")
    ap.add_argument("--skip-other-eps", action="store_true", help="only the ε = 3 cells and their twins")
    ap.add_argument("--report", action="store_true", help="print the table and write <out>.png; run nothing")
    args = ap.parse_args()
    if args.report:
        rows = read_done(args.out)
        print(table(rows))
        plot(rows, args.out.with_suffix(".png"))
        return
    extra = TINY if args.tiny else []

    def runner(cell: Cell, overrides: list[str]) -> dict[str, Any]:
        return simulate(cell, [*extra, *overrides])

    cells = grid(args.methods, args.clients, args.local_steps, rounds=args.rounds, seeds=args.seeds)
    kw = {"runner": runner, "batch": args.batch, "physical": args.physical_batch}
    done = run_map(cells, args.out, **kw)
    if not args.skip_other_eps:
        run_map(best_cells(done), args.out, **kw)
    print(table(read_done(args.out)))


if __name__ == "__main__":
    main()
