"""Running a benchmark's cells: one simulation in this process, or a sweep of `fl-sim` processes.

`simulate` runs in this process, so what a benchmark measures around it (wall time, the process tree's memory)
is the run's own; a grid that must survive a crash in one cell, or be read by `fl-report`, is a sweep
(`named_sweep`, `run_cases`: `simulations.sweep`, one fresh process and one run folder per cell, resumable).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl import constants as K
from fl.outputs import read_metrics
from simulations import sweep
from simulations.harness.cli import parser


@dataclass(frozen=True)
class Run:
    """A finished simulation: its folder, its metrics rows (round 0 first) and its wall time in seconds."""

    run_dir: Path
    rows: list[dict[str, Any]]
    wall_s: float  # run_simulation in this process (start-up and evaluation included); a resumed run: its summary's

    @property
    def final(self) -> dict[str, Any]:
        """The last round's metrics."""
        return self.rows[-1]

    @property
    def trained(self) -> list[dict[str, Any]]:
        """The rows of the training rounds (round 0 is the initial model's evaluation)."""
        return [r for r in self.rows if r["round"] > 0]

    @property
    def summary(self) -> dict[str, Any]:
        """The run's summary.json."""
        return json.loads((self.run_dir / K.SUMMARY_FILE).read_text())


def simulate(overrides: Sequence[str], *, run_dir: Path | None = None, prefix: str = "bench-") -> Run:
    """Run one simulation of `overrides` in this process and read its metrics.

    Without `run_dir` it runs in a fresh temporary folder. With one, a folder that holds summary.json is read, not
    run again (a benchmark re-run resumes), and an unfinished one starts over.
    """
    from fl.app.simulation import run_simulation  # Flower and Ray load only when a benchmark simulates

    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix=prefix)) / "run"
    elif (run_dir / K.SUMMARY_FILE).is_file():
        done = json.loads((run_dir / K.SUMMARY_FILE).read_text())
        return Run(run_dir, read_metrics(run_dir), float(done["wall_seconds"]))
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run_simulation([*overrides, f"run_dir={run_dir}"])
    return Run(run_dir, read_metrics(run_dir), time.perf_counter() - t0)


def named_sweep(doc: str | None, name: str, *, default_dir: str, argv: Sequence[str] | None = None) -> Path:
    """`python -m simulations.bench_X [--dir DIR] [overrides...]`: run (or resume) configs/sweep/<name>.yaml in DIR,
    the overrides added to every cell; returns DIR. A failed cell does not stop it, a user error does."""
    ap = parser(doc)
    ap.add_argument("--dir", default=default_dir, help="the sweep folder (resumable)")
    args, overrides = ap.parse_known_args(argv)
    sweep.run_named(name, overrides, args.dir)
    return Path(args.dir)


def run_cases(cases: Sequence[Sequence[str]], root: Path) -> list[dict[str, Any] | None]:
    """Run (or skip, when done) one `fl-sim` process per case under `root`; each case's final metrics row, None
    where the cell failed."""
    record = sweep.run_sweep([], root, cases=[list(c) for c in cases])
    by_overrides = {" ".join(e["overrides"]): e for e in record["cells"].values()}
    out: list[dict[str, Any] | None] = []
    for case in cases:
        entry = by_overrides.get(" ".join(case))
        rows = read_metrics(Path(entry["dir"])) if entry and entry["status"] == "done" else []
        out.append(rows[-1] if rows else None)
    return out


def finished_cells(root: Path) -> Iterator[tuple[DictConfig, list[dict[str, Any]]]]:
    """(config, metrics rows) of every finished cell of the sweep folder `root`, in folder order."""
    for summary in sorted(root.glob(f"cells/*/{K.SUMMARY_FILE}")):
        cfg = OmegaConf.load(summary.parent / K.CONFIG_FILE)
        assert isinstance(cfg, DictConfig)  # a run's config.yaml is a mapping
        yield cfg, read_metrics(summary.parent)
