"""Benchmark how the simulation scales with the number of virtual clients, 10 sampled per round.

Usage::

    bash dev.sh python -m simulations.bench_scale [--sizes 10 100 1000] [--rounds 3]

For each size N (tiny model, the full tweet pool split IID, `sim.fraction_train = 10/N`) it runs one
simulation and records the mean seconds per round (sending, client training, aggregation; central
evaluation excluded) and the peak resident memory of the whole process tree (this process, Ray and its
actors), sampled every 0.2 s. Prints both as ratios to the first size (goal: within 1.2×).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env


class PeakRSS:
    """Peak summed RSS (bytes) of this process and all its descendants while running."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process may exit between listing and reading
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_size(n: int, rounds: int, sampled: int) -> dict[str, Any]:
    from fl.app.simulation import run_simulation

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-")) / "run"
    overrides = [
        "model=tiny",
        "data.partitioner=iid",
        "data.test_size=500",
        "train.local_steps=5",
        f"sim.num_clients={n}",
        f"sim.fraction_train={sampled / n}",
        f"sim.min_train_clients={min(sampled, n)}",
        f"sim.rounds={rounds}",
        f"run_dir={run_dir}",
    ]
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        run_simulation(overrides)
    rows = [r for r in read_metrics(run_dir) if r["round"] > 0]
    return {
        "clients": n,
        "sampled_per_round": rows[-1]["sampled"],
        "s_per_round": sum(r["round_seconds"] for r in rows) / len(rows),
        "peak_rss_MB": mem.peak / 2**20,
        "job_wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampled", type=int, default=10)
    args = ap.parse_args()
    results = [run_size(n, args.rounds, args.sampled) for n in args.sizes]
    base = results[0]
    for r in results:
        r["s_per_round_ratio"] = r["s_per_round"] / base["s_per_round"]
        r["peak_rss_ratio"] = r["peak_rss_MB"] / base["peak_rss_MB"]
    print(json.dumps(results, indent=2))
    print("\n| clients | sampled/round | s/round | ratio | peak RSS MB | ratio | job wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['sampled_per_round']} | {r['s_per_round']:.2f} | {r['s_per_round_ratio']:.2f} "
            f"| {r['peak_rss_MB']:.0f} | {r['peak_rss_ratio']:.2f} | {r['job_wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
