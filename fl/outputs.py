"""A run's output folder: config.yaml, metrics.jsonl (one line per round), summary.json, adapter/."""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fl import constants as K
from fl.config import to_yaml


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunOutputs:
    """Writer for one run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / K.METRICS_FILE
        self.adapter_dir = self.dir / K.ADAPTER_DIR

    def write_config(self, cfg: DictConfig) -> None:
        write_atomic(self.dir / K.CONFIG_FILE, to_yaml(cfg))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Start metrics.jsonl over with `rows` (empty for a new run; the checkpoint's on resume)."""
        write_atomic(self.metrics_path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_clean(row)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.dir / K.SUMMARY_FILE, json.dumps(_clean(summary), indent=2) + "\n")


def written_since(path: Path, since_ns: int) -> bool:
    """`path` exists and was written at or after `since_ns` (time.time_ns()): this run's file, not a previous one's."""
    return path.is_file() and path.stat().st_mtime_ns >= since_ns


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / K.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_round(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The round a run would pick, chosen on the validation split (`data.val_size`), and its test accuracy;
    without a validation split there is no honest choice: both None. The latest round wins a tie."""
    scored = [r for r in history if r.get(K.VAL_ACCURACY) is not None]
    if not scored:
        return {"best_round": None, "best_round_accuracy": None, "best_round_val_accuracy": None}
    best = max(reversed(scored), key=lambda r: r[K.VAL_ACCURACY])
    return {
        "best_round": best["round"],
        "best_round_accuracy": best["accuracy"],
        "best_round_val_accuracy": best[K.VAL_ACCURACY],
    }


def late_swing(history: list[dict[str, Any]], last: int = 3) -> float | None:
    """The largest change in test accuracy between consecutive rounds among the last `last` federated rounds
    (round 0, the starting model, excluded), e.g. 46.2 → 56.2 → 59.2 gives 0.10; None with fewer than 2 rounds.

    A final accuracy is only as citable as the rounds before it are stable: a run that swings by 10 points a round
    ends wherever the last draw of clients left it. Rounds before the last may score a seeded subset of the
    held-out split (`sim.round_eval_size`), the last all of it, so the last step carries that subset's sampling
    error too.
    """
    if last < 2:
        raise ValueError(f"late_swing: last={last}; a swing needs at least 2 rounds.")
    scored = [float(r["accuracy"]) for r in history if r.get("round", 0) >= 1 and r.get("accuracy") is not None]
    tail = scored[-last:]
    if len(tail) < 2:
        return None
    return max(abs(b - a) for a, b in pairwise(tail))
