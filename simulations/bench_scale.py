"""Benchmark how the simulation scales with the number of virtual clients, 10 sampled per round.

Usage::

    bash dev.sh python -m simulations.bench_scale [--sizes 10 100 1000] [--rounds 3]

For each size N (tiny model, the full tweet pool split IID, `sim.fraction_train = 10/N`) it runs one
simulation and records the mean seconds per round (sending, client training, aggregation; central
evaluation excluded) and the peak resident memory of the whole process tree (this process, Ray and its
actors), sampled every 0.2 s. Prints both as ratios to the first size (goal: within 1.2×).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from simulations import harness
from simulations.harness.timing import PeakRSS


def run_size(n: int, rounds: int, sampled: int) -> dict[str, Any]:
    """One simulation of `n` clients, `sampled` a round: seconds per round and the process tree's peak memory."""
    overrides = [
        "model=tiny",
        "data.partitioner=iid",
        "data.test_size=500",
        "train.local_steps=5",
        f"sim.num_clients={n}",
        f"sim.fraction_train={sampled / n}",
        f"sim.min_train_clients={min(sampled, n)}",
        f"sim.rounds={rounds}",
    ]
    with PeakRSS() as mem:
        run = harness.simulate(overrides, prefix=f"bench-scale-{n}-")
    rows = run.trained
    return {
        "clients": n,
        "sampled_per_round": rows[-1]["sampled"],
        "s_per_round": sum(r["round_seconds"] for r in rows) / len(rows),
        "peak_rss_MB": mem.peak / 2**20,
        "job_wall_s": run.wall_s,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Every size in turn; the JSON, then a table of ratios to the first size."""
    ap = harness.parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000], help="virtual clients per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    args = harness.parse(ap, argv)
    results = [run_size(n, args.rounds, args.sampled) for n in args.sizes]
    base = results[0]
    for r in results:
        r["s_per_round_ratio"] = r["s_per_round"] / base["s_per_round"]
        r["peak_rss_ratio"] = r["peak_rss_MB"] / base["peak_rss_MB"]
    print(json.dumps(results, indent=2))
    head = ["clients", "sampled/round", "s/round", "ratio", "peak RSS MB", "ratio", "job wall s"]
    rows = [
        [
            r["clients"],
            r["sampled_per_round"],
            f"{r['s_per_round']:.2f}",
            f"{r['s_per_round_ratio']:.2f}",
            f"{r['peak_rss_MB']:.0f}",
            f"{r['peak_rss_ratio']:.2f}",
            f"{r['job_wall_s']:.0f}",
        ]
        for r in results
    ]
    print("\n" + harness.md_table(head, rows), end="")


if __name__ == "__main__":
    main()
