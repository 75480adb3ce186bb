"""Following a deployed run from its run folder: each new metrics.jsonl row logged until summary.json appears."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl import constants as K
from fl.deploy.process import DeployError
from fl.outputs import written_since

log = logging.getLogger(__name__)


def _log_row(row: dict[str, Any], rounds: int) -> None:
    log.info(
        "[deploy] round %d/%d accuracy=%.4f loss=%.4f up=%s B down=%s B wall=%.1fs",
        row["round"],
        rounds,
        row["accuracy"],
        row["loss"],
        row.get("bytes_up", 0),
        row.get("bytes_down", 0),
        row["wall_seconds"],
    )


def follow_run(
    run_dir: Path,
    *,
    since_ns: int,
    rounds: int,
    check: Callable[[], None],
    timeout: float | None = None,
    poll: float = 1.0,
) -> dict[str, Any]:
    """Log each new metrics.jsonl row until a summary.json newer than `since_ns` appears; return it.

    `check()` is called every `poll` s and raises when the run cannot finish any more (a process died,
    the SuperLink reports the run failed).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    metrics, summary = run_dir / K.METRICS_FILE, run_dir / K.SUMMARY_FILE
    seen = 0
    while True:
        fresh = written_since(metrics, since_ns)  # not a previous run's rows
        lines = [ln for ln in metrics.read_text().splitlines(keepends=True) if ln.endswith("\n")] if fresh else []
        seen = 0 if len(lines) < seen else seen  # rewritten (the ServerApp starts the file over)
        for line in lines[seen:]:
            _log_row(json.loads(line), rounds)
        seen = len(lines)
        if written_since(summary, since_ns):
            return dict(json.loads(summary.read_text()))
        if deadline is not None and time.monotonic() > deadline:
            raise DeployError(f"No {summary} after {timeout:.0f} s.")
        check()
        time.sleep(poll)
