"""Benchmark a sweep's cells one after another against two at a time (Hydra's joblib launcher) on this machine.

Usage::

    bash dev.sh python -m simulations.bench_launch [--dir multirun/bench-launch] [--rounds 3] [--runtime ray]

The same grid of MiniLM cells (FedIT and FFA-LoRA × seeds 0 and 1; 5 clients, Dirichlet α=0.5, every client
every round) runs twice through `fl-sweep`, in one process, one arm after the other: `--launcher basic` (each cell
gets every core) and `--launcher joblib --jobs 2` (each cell one share of them). Prints the wall time of each
arm, their ratio (parallel ÷ sequential: below 1 means two cells at once pays on this machine), and whether every
cell's final metrics are the same on both launchers (they must be: a cell's seed fixes its run). Each arm's folder
under `--dir` is emptied first: a timing is of whole sweeps, never of cells resumed from an earlier call.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations import harness
from simulations.sweep import main as fl_sweep

GRID = ["strategy=fedit,ffa_lora", "seed=0,1"]
ARMS = {"sequential": ["--launcher", "basic"], "2 parallel": ["--launcher", "joblib", "--jobs", "2"]}
COMPARED = ("final_accuracy", "final_loss")


def run_arm(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One arm's sweep in a fresh folder: its wall time and each cell's final metrics."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        fl_sweep([*overrides, "--dir", str(out), *ARMS[name]])
    except SystemExit as done:
        if done.code not in (0, None):
            raise RuntimeError(f"the {name} arm's sweep exited {done.code}; its cells are in {out}") from None
    wall = time.perf_counter() - t0
    finals = {}
    for summary in sorted(out.glob("cells/*/summary.json")):
        data = json.loads(summary.read_text())
        finals[summary.parent.name] = {k: data.get(k) for k in COMPARED}
    return {"arm": name, "wall_s": wall, "cells": finals}


def main(argv: Sequence[str] | None = None) -> None:
    """Both arms in turn; the JSON, then the table with the ratio."""
    ap = harness.parser(__doc__)
    ap.add_argument("--dir", default="multirun/bench-launch", help="the two sweeps' folders go under it")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="local steps a round")
    ap.add_argument("--runtime", default="ray", choices=["ray", "inline"], help="each cell's simulation runtime")
    args = harness.parse(ap, argv)
    overrides = [
        *GRID,
        "sim.num_clients=5",
        f"sim.rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "data.partitioner=dirichlet",
        "data.alpha=0.5",
        "data.test_size=500",
        f"sim.runtime={args.runtime}",
    ]
    root = Path(args.dir)
    results = [run_arm(name, overrides, root / name.replace(" ", "-")) for name in ARMS]
    seq, par = results
    same = seq["cells"] == par["cells"] and len(seq["cells"]) == 4
    summary = {
        "overrides": overrides,
        "arms": results,
        "ratio_parallel_to_sequential": par["wall_s"] / seq["wall_s"],
        "same_metrics": same,
    }
    harness.write_json(root / "bench_launch.json", summary)
    print(json.dumps(summary, indent=2))
    rows = [[r["arm"], len(r["cells"]), f"{r['wall_s']:.0f}", f"{r['wall_s'] / seq['wall_s']:.2f}"] for r in results]
    print("\n" + harness.md_table(["arm", "cells", "wall s", "÷ sequential"], rows), end="")
    print(f"every cell's final metrics equal on both launchers: {same}")


if __name__ == "__main__":
    main()
