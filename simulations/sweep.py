"""`fl-sweep`: run a grid of simulations, one normal run folder per cell; resumable; failures recorded.

Usage::

    fl-sweep sweep=clients                                  # a ready grid from configs/sweep/clients.yaml
    fl-sweep strategy=fedit,fed_sb sim.num_clients=5,10     # any grid, in Hydra's sweep syntax
    fl-sweep sweep=heterogeneity model=tiny --dir multirun/het   # a ready grid + fixed overrides

The grid is expanded with Hydra's own override parser (comma lists, `range(...)`, `choice(...)`),
so a cell's overrides are exactly what `fl-sim` would take. Each cell runs `fl-sim` in a fresh process
(a crash, a bad value or an out-of-memory in one cell cannot take the sweep down) and writes
`<dir>/cells/<cell>/` like any run. Re-running the same command on the same `--dir` skips the cells that
finished (they have summary.json) and retries the others — a cell stopped mid-run (it has checkpoint.pt)
continues from its last complete round with `fl-sim resume=<cell>`; `sweep.json` records each cell's status.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fl.app.cli import exit_on_user_error
from fl.app.config import CONFIG_DIR, compose
from fl.app.progress import clock
from fl.checkpoint import CHECKPOINT_FILE
from simulations.launch import LAUNCHERS, SWEEP_FILE, Launch, launch_cells, write_json

SWEEP_DIR = CONFIG_DIR / "sweep"


def load_sweep(name: str) -> tuple[list[str], list[list[str]]]:
    """A ready sweep from configs/sweep/<name>.yaml: (overrides incl. its `grid` as sweep overrides, `cases`).

    `cases` is a list of override lists crossed with the grid — for axes that are not a product, e.g.
    iid vs Dirichlet α=0.1 vs α=0.5, or no DP vs ε ∈ {1, 3, 8}.
    """
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"sweep={name!r} is not in {SWEEP_DIR}; ready sweeps: {', '.join(names)}.")
    spec = OmegaConf.load(path)
    if not isinstance(spec, DictConfig):
        raise ValueError(f"{path}: a sweep file is a mapping with description, overrides, grid, cases.")
    unknown = {str(k) for k in spec} - {"overrides", "grid", "cases", "description"}
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; a sweep file has description, overrides, grid, cases."
        )
    out = [str(o) for o in spec.get("overrides", [])]
    for key, values in (spec.get("grid") or {}).items():
        out.append(f"{key}={','.join(str(v) for v in values)}")
    cases = [[str(o) for o in case] for case in (spec.get("cases") or [])]
    return out, cases


def expand(overrides: list[str], cases: list[list[str]] | None = None) -> list[list[str]]:
    """The grid's cells: the product of every sweep override's values (Hydra's grammar) and the cases."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes: list[list[list[str]]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([[f"{key}={v}"] for v in o.sweep_string_iterator()])
        else:
            axes.append([[f"{key}={o.get_value_element_as_str()}"]])
    if cases:
        axes.append(cases)
    return [[o for part in cell for o in part] for cell in itertools.product(*axes)]


def cell_id(cell: list[str], axes_keys: list[str]) -> str:
    """A readable, stable folder name from the varying overrides (+ a short hash of all of them)."""
    varying = [o for o in cell if o.split("=", 1)[0] in axes_keys] or cell
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(o.replace("=", "-") for o in varying))[:120]
    return f"{slug}-{hashlib.sha1(' '.join(cell).encode()).hexdigest()[:6]}"


def run_sweep(
    overrides: list[str],
    sweep_dir: Path,
    *,
    cases: list[list[str]] | None = None,
    timeout: float | None = None,
    launch: Launch | None = None,
) -> dict[str, Any]:
    """Run (or resume) every cell through Hydra's launcher `launch` (default: one after another here); returns
    the sweep record also written to sweep.json.

    Hydra's multirun runs the cells (`simulations.launch`); what it does not do is kept here: the cases (axes
    that are not a product), a stable folder per cell, skipping the cells that finished and resuming the
    stopped ones from their checkpoints (Hydra starts every job afresh, numbered by position), recording each
    cell's end in sweep.json as it comes and the progress line with its ETA (a sweeper learns of its jobs only
    when the whole batch returns), and a failed cell that does not end the others (Hydra's sweepers raise on
    the first failed job).
    """
    launch = launch or Launch()
    cells = expand(overrides, cases)
    keys = [o.split("=", 1)[0] for o in overrides if "," in o.split("=", 1)[-1] or "(" in o.split("=", 1)[-1]]
    keys += [o.split("=", 1)[0] for case in cases or [] for o in case]
    for cell in cells:  # every cell's config must compose before anything runs
        compose(cell)
    sweep_dir = sweep_dir.resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record_path = sweep_dir / SWEEP_FILE
    record: dict[str, Any] = {"overrides": overrides, "launcher": launch.launcher, "cells": {}}
    pending = []
    for cell in cells:
        cid = cell_id(cell, keys)
        run_dir = sweep_dir / "cells" / cid
        entry: dict[str, Any] = {"overrides": cell, "dir": str(run_dir), "status": "pending"}
        record["cells"][cid] = entry
        if (run_dir / "summary.json").is_file():
            entry["status"] = "done"
            continue
        pending.append(cid)
        entry["tracking"] = tracking_overrides(cell, sweep_dir, cid, keys)
        entry["checkpoint"] = str(run_dir / CHECKPOINT_FILE)
        if (run_dir / CHECKPOINT_FILE).is_file():  # a cell stopped mid-run continues from its last complete round
            entry["resume"] = True
    write_json(record_path, record)
    total = len(pending)
    print(
        f"fl-sweep: {len(cells)} cells, {len(cells) - total} already done, {total} to run "
        f"({launch.launcher} launcher) -> {sweep_dir}"
    )
    t0, ended = time.monotonic(), 0

    def on_status(cid: str, status: dict[str, Any]) -> None:
        nonlocal ended
        entry = record["cells"][cid]
        entry.update(status)
        entry.pop("resume", None)
        ended += 1
        if status["status"] == "failed":
            print(f"  cell {cid} FAILED: {status['error']}", file=sys.stderr)
        write_json(record_path, record)
        _progress(ended, total, t0, cid)

    if pending:
        _progress(0, total, t0, "")
        broken = launch_cells(sweep_dir, pending, launch, timeout=timeout, on_status=on_status)
        for cid in pending:  # cells the launcher never ran (e.g. a Slurm submission refused)
            if record["cells"][cid]["status"] == "pending":
                on_status(cid, {"status": "failed", "error": broken or "the launcher did not run it"})
    for entry in record["cells"].values():
        for key in ("tracking", "checkpoint", "resume"):
            entry.pop(key, None)
    write_json(record_path, record)
    failed = [c for c, e in record["cells"].items() if e["status"] == "failed"]
    print(
        f"fl-sweep: {len(cells) - len(failed)}/{len(cells)} cells done, {len(failed)} failed. "
        f"Report: fl-report {sweep_dir}"
    )
    return record


def tracking_overrides(cell: list[str], sweep_dir: Path, cid: str, keys: list[str]) -> list[str]:
    """With `tracking=` on, the sweep is one experiment (named after its folder, unless `tracking.experiment`
    is given) in one store under the sweep folder (unless `tracking.uri` is given), one run per cell named
    after it and tagged with the cell's swept keys. Not part of the cell's id: resuming finds the same cells."""
    cfg = compose(cell)
    backend = str(cfg.tracking.backend)
    if backend == "none":
        return []
    given = {o.split("=", 1)[0].lstrip("+") for o in cell}
    out = [f"tracking.run_name={cid}"]
    if "tracking.experiment" not in given:
        out.append(f"tracking.experiment={sweep_dir.resolve().name}")
    if "tracking.uri" not in given:
        root = sweep_dir.resolve()
        out.append(f"tracking.uri={root / 'mlruns' if backend == 'mlflow' else root / backend}")
    tags = [o for o in cell if o.split("=", 1)[0] in keys]
    if tags and "tracking.tags" not in given:
        out.append("tracking.tags=[" + ",".join(repr(t) for t in tags) + "]")
    return out


def _progress(ended: int, total: int, t0: float, cid: str) -> None:
    """Cells ended of total, elapsed, and an ETA from the mean time per ended cell so far (with parallel cells,
    their throughput)."""
    elapsed = time.monotonic() - t0
    eta = elapsed / ended * (total - ended) if ended else float("nan")
    width = 30
    bar = "#" * int(width * ended / max(total, 1))
    eta_s = "?" if eta != eta else clock(eta)
    line = f"[{bar:<{width}}] cells {ended}/{total} done · elapsed {clock(elapsed)} · ETA {eta_s}"
    print(f"{line}  {cid}" if cid else line, flush=True)


def run_named(name: str, extra: list[str], sweep_dir: str | Path) -> None:
    """`fl-sweep sweep=NAME [extra overrides] --dir DIR` for a benchmark script, which reports afterwards
    whatever finished: a failed cell (exit 1) does not stop it, a user error (exit 2) does."""
    try:
        main([f"sweep={name}", *extra, "--dir", str(sweep_dir)])
    except SystemExit as done:
        if done.code not in (0, 1, None):
            raise


def main(argv: list[str] | None = None) -> None:
    """`fl-sweep [sweep=NAME] [overrides...] [--dir DIR] [--timeout S] [--launcher L --jobs N --cpus C ...]`."""
    ap = argparse.ArgumentParser(prog="fl-sweep", description="Run a grid of fl-sim runs (resumable).")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides; comma lists are swept; sweep=NAME loads a ready grid; hydra.launcher.* go to it",
    )
    ap.add_argument("--dir", help="sweep folder (default multirun/<date>/<time>); reuse it to resume")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per cell before it counts as failed")
    ap.add_argument("--launcher", default="basic", choices=LAUNCHERS, help="Hydra launcher (default: one at a time)")
    ap.add_argument("--jobs", type=int, default=None, help="cells at once (joblib workers, Slurm array parallelism)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs per cell (default: this machine's cores / --jobs)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per cell (Submitit)")
    ap.add_argument("--mem-gb", type=int, default=None, help="memory per cell in GB (Submitit)")
    ap.add_argument("--ray-address", default=None, help="--launcher ray: the cluster every cell's simulation joins")
    args = ap.parse_args(argv)
    overrides: list[str] = []
    extra: list[str] = []
    cases: list[list[str]] = []
    for o in args.overrides:
        if o.startswith("sweep="):
            more, cases = exit_on_user_error("fl-sweep", partial(load_sweep, o.split("=", 1)[1]))
            overrides.extend(more)
        elif o.startswith(("hydra.launcher.", "hydra/launcher=")):
            extra.append(o)
        else:
            overrides.append(o)
    if not cases and not any("," in o for o in overrides):
        print("fl-sweep: no swept value (use a=1,2 or sweep=NAME); running a single cell.", file=sys.stderr)
    jobs = args.jobs or (1 if args.launcher in ("basic", "ray") else 2)
    launch = exit_on_user_error(
        "fl-sweep",
        lambda: Launch(
            args.launcher,
            jobs=jobs,
            cpus=args.cpus,
            gpus=args.gpus,
            mem_gb=args.mem_gb,
            ray_address=args.ray_address,
            extra=extra,
        ),
    )
    now = datetime.now()
    sweep_dir = Path(args.dir or Path("multirun") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S"))
    record = exit_on_user_error(
        "fl-sweep", lambda: run_sweep(overrides, sweep_dir, cases=cases, timeout=args.timeout, launch=launch)
    )
    sys.exit(1 if any(e["status"] == "failed" for e in record["cells"].values()) else 0)


if __name__ == "__main__":
    main()
