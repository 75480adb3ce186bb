"""`fl-deploy --bench`: the same job in simulation and in deployment (cold and warm), seconds per round."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fl import constants as K
from fl.deploy.runner import deploy, prepare_overrides


def seconds_per_round(run_dir: Path) -> float:
    """Mean wall seconds of one round after round 0 (start-up, Fed-SB init and nodes joining excluded)."""
    rows = [json.loads(line) for line in (run_dir / K.METRICS_FILE).read_text().splitlines() if line.strip()]
    return (rows[-1]["wall_seconds"] - rows[0]["wall_seconds"]) / max(1, rows[-1]["round"] - rows[0]["round"])


def bench(overrides: Sequence[str], *, clients: int | None = None, insecure: bool = False) -> dict[str, Any]:
    """Time one job in simulation, then in deployment with Flower's per-message ClientApp processes
    ("cold") and with warm ClientApps; print seconds per round of each and the ratios to simulation.

    All three must end with the same metrics; `bench.json` in the run folder keeps the figures.
    """
    from fl.app.simulation import run_simulation

    ov, base = prepare_overrides(overrides, clients=clients)
    job = [o for o in ov if not o.startswith("run_dir=")]
    runs: dict[str, Callable[[Path], Path]] = {
        "simulation": lambda d: run_simulation([*job, f"run_dir={d}"]),
        "deployment_cold": lambda d: deploy([*job, f"run_dir={d}"], insecure=insecure),
        "deployment_warm": lambda d: deploy([*job, f"run_dir={d}"], insecure=insecure, warm=True),
    }
    res: dict[str, Any] = {}
    finals = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        run_dir = run(base / name)
        res[f"{name}_total_s"] = time.perf_counter() - t0
        res[f"{name}_s_per_round"] = seconds_per_round(run_dir)
        summary = json.loads((run_dir / K.SUMMARY_FILE).read_text())
        finals[name] = (summary["final_accuracy"], summary["final_loss"], summary["cum_bytes_up"])
    sim = res["simulation_s_per_round"]
    for name in ("deployment_cold", "deployment_warm"):
        res[f"{name}_ratio"] = res[f"{name}_s_per_round"] / sim
    res["final_metrics"] = {k: list(v) for k, v in finals.items()}
    res["same_final_metrics"] = len(set(finals.values())) == 1
    (base / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nSeconds per round after round 0, same config ({' '.join(job)}); outputs in {base}:")
    for name in runs:
        ratio = f"{res[name + '_ratio']:6.1f}x simulation" if name != "simulation" else " " * 17
        per_round, total = res[f"{name}_s_per_round"], res[f"{name}_total_s"]
        print(f"  {name:16s} {per_round:7.2f} s/round  {ratio}  ({total:.0f} s end to end)")
    print(f"  goal: deployment <= 2x simulation; final accuracy/loss/bytes identical: {res['same_final_metrics']}")
    return res
