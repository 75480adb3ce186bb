"""A sweep's cells through Hydra's launchers: one Hydra multirun over the cells that `fl-sweep` has left to run.

`fl-sweep` writes the plan (`sweep.json`: each cell's overrides and run folder) and then runs a plain Hydra
multirun whose jobs are its pending cells (the command is in `<DIR>/launcher/command.txt`)::

    python -m simulations.launch -m sweep_dir=DIR 'cell=ID1,ID2' cpus=1 hydra/launcher=joblib hydra.launcher.n_jobs=2

Hydra's sweeper and the chosen launcher run one job per cell: `basic` one after another in the multirun's
process, `joblib` in processes of this machine, `submitit_local` / `submitit_slurm` as Submitit jobs (local
processes or Slurm jobs). The job (`run_cell`) runs its cell as an `fl-sim` process, so a crash, a bad value or
an out-of-memory in one cell cannot take the others down, and records how it ended in
`<DIR>/launcher/<ID>/status.json`, which `fl-sweep` reads while the multirun goes on (its progress line and
`sweep.json`). A job never raises: Hydra's sweeper would stop the sweep at the first failed job.

Resources: each cell is given `cpus` (its share of the launcher's machine or Slurm allocation) and uses
exactly those: its local Ray gets `sim.cpus` CPUs and its torch/BLAS pools that many threads (each ClientApp
`sim.client_cpus`). With `ray_address` the cell's simulation joins that Ray cluster (`sim.ray_address`)
instead of starting a Ray of its own, and cells run one after another (`Launch`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import psutil
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from fl.app.processes import die_with_parent
from fl.outputs import write_atomic

SWEEP_FILE = "sweep.json"
LAUNCHER_DIR = "launcher"  # inside the sweep folder: Hydra's multirun folder, a status.json per cell, the log
STATUS_FILE = "status.json"
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # torch's pools read these at start
LAUNCHERS = ("basic", "joblib", "ray", "submitit_local", "submitit_slurm")
PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit": "hydra_plugins.hydra_submitit_launcher"}
POLL = 1.0  # seconds between looks at the cells' status files


@dataclass
class CellJob:
    """One job of the multirun: which cell of which sweep, and what the launcher gave it."""

    sweep_dir: str = MISSING
    cell: str = MISSING
    timeout: float | None = None  # seconds before the cell counts as failed
    cpus: int | None = None  # CPUs the launcher gave the cell (null: every core of its machine)
    ray_address: str | None = None  # a Ray cluster the cell's simulation joins


ConfigStore.instance().store(name="cell_job", node=CellJob)


@dataclass
class Launch:
    """How `fl-sweep` runs its cells: a Hydra launcher and what each cell may use.

    `jobs` cells at once (joblib's workers; Slurm's array parallelism), each with `cpus` CPUs (default: this
    machine's cores shared by `jobs`; set it for Slurm), `gpus` GPUs and `mem_gb` of memory (Submitit).
    `ray`: each cell's simulation joins the cluster at `ray_address` and spreads its clients over every node
    (each takes `sim.client_cpus`/`sim.client_gpus` there); its cells run one after another, because Flower 1.41
    sizes a simulation's actor pool from the CPUs of the whole cluster (`pool_size_from_resources`) and hands
    messages to actors Ray has not placed yet: two simulations on one cluster would each claim all of it and
    could wait on each other's actors for ever. `extra`: more `hydra.launcher.*` overrides (e.g. a partition).
    """

    launcher: str = "basic"
    jobs: int = 1
    cpus: int | None = None
    gpus: int = 0
    mem_gb: int | None = None
    ray_address: str | None = None
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher {self.launcher!r}: use one of {', '.join(LAUNCHERS)}.")
        if self.jobs < 1 or (self.cpus is not None and self.cpus < 1):
            raise ValueError(f"--jobs {self.jobs} --cpus {self.cpus}: use positive counts.")
        if self.launcher == "ray":
            if not self.ray_address:
                raise ValueError("--launcher ray needs --ray-address HOST:PORT (or auto): the cluster's address.")
            if self.jobs != 1:
                raise ValueError(
                    f"--launcher ray --jobs {self.jobs}: a Flower simulation claims every CPU of the cluster it "
                    "joins, so cells run one at a time there (each spreads its clients over every node)."
                )
        elif self.ray_address:
            raise ValueError(f"--ray-address is for --launcher ray, not {self.launcher}.")
        plugin = PLUGINS.get(self.launcher.split("_")[0])
        if plugin:
            import importlib.util

            if importlib.util.find_spec(plugin) is None:
                raise ValueError(
                    f"--launcher {self.launcher} needs {plugin.split('.')[1].replace('_', '-')}: "
                    "install the project's `launchers` extra (bash dev.sh names it when a command asks for it)."
                )

    def cell_cpus(self) -> int | None:
        """The CPUs of one cell: given, or this machine's cores shared by the cells at once (None: all)."""
        if self.cpus is not None or self.launcher == "ray":
            return self.cpus if self.launcher != "ray" else None
        if self.launcher == "basic" and self.jobs == 1:
            return None  # one cell at a time on this machine: every core, as `fl-sim` alone
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def hydra_overrides(self, *, timeout: float | None) -> list[str]:
        """The multirun's launcher overrides: which launcher, its parallelism, the resources of each job."""
        name = "basic" if self.launcher == "ray" else self.launcher
        out = [f"hydra/launcher={name}"]
        cpus = self.cell_cpus()
        if self.launcher == "joblib":
            out.append(f"hydra.launcher.n_jobs={self.jobs}")
        elif self.launcher.startswith("submitit"):
            out.append(f"hydra.launcher.cpus_per_task={cpus or os.cpu_count() or 1}")
            out.append(f"hydra.launcher.gpus_per_node={self.gpus}")
            if self.mem_gb:
                out.append(f"hydra.launcher.mem_gb={self.mem_gb}")
            if timeout:  # the scheduler's limit: the cell's own timeout and a margin to record it
                out.append(f"hydra.launcher.timeout_min={int(timeout // 60) + 5}")
            if self.launcher == "submitit_slurm":
                out.append(f"hydra.launcher.array_parallelism={self.jobs}")
        return [*out, *self.extra]


def status_path(sweep_dir: Path, cid: str) -> Path:
    return sweep_dir / LAUNCHER_DIR / cid / STATUS_FILE


def read_status(sweep_dir: Path, cid: str) -> dict[str, Any] | None:
    path = status_path(sweep_dir, cid)
    return dict(json.loads(path.read_text())) if path.is_file() else None


def cell_command(entry: dict[str, Any], *, cpus: int | None, ray_address: str | None) -> list[str]:
    """The `fl-sim` command of a planned cell: its overrides, or `resume=` from its checkpoint, plus the
    resources it was given (not part of the cell's id: the same cell resumes on any launcher)."""
    args = [f"resume={entry['dir']}"] if entry.get("resume") else list(entry["overrides"])
    args += entry.get("tracking", [])
    if ray_address:
        args.append(f"sim.ray_address={ray_address}")
    elif cpus:
        args.append(f"sim.cpus={cpus}")
    return [sys.executable, "-m", "fl.app.cli", *args, f"hydra.run.dir={entry['dir']}"]


def run_cell(
    sweep_dir: Path, cid: str, *, timeout: float | None, cpus: int | None, ray_address: str | None = None
) -> dict[str, Any]:
    """Run one planned cell as an `fl-sim` process; write and return its status (never raises)."""
    entry = json.loads((sweep_dir / SWEEP_FILE).read_text())["cells"][cid]
    run_dir = Path(entry["dir"])
    env = os.environ.copy()
    if cpus and not ray_address:  # the ServerApp's torch and BLAS pools; each ClientApp takes sim.client_cpus
        env.update(dict.fromkeys(THREAD_ENVS, str(cpus)))
    status: dict[str, Any] = {"resumed": bool(entry.get("resume")), "host": os.uname().nodename}
    started = time.monotonic()
    with tempfile.TemporaryFile("w+", errors="replace") as output:  # not a pipe: a long log would fill it
        try:
            # the cell's fl-sim dies with this job (and, through its own children, every process it started)
            proc: subprocess.Popen[str] | None = subprocess.Popen(
                cell_command(entry, cpus=cpus, ray_address=ray_address),
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                preexec_fn=die_with_parent(),
            )
        except OSError as e:  # e.g. the venv is missing on this node
            proc, tail = None, f"could not start fl-sim: {e}"
        if proc is not None:
            ended = _follow(proc, timeout=timeout)
            if ended == "orphaned":  # the launcher is gone (a stopped fl-sweep): the next call plans it again
                return {"status": "stopped"}
            output.seek(0)
            out = output.read()
            tail = out[-4000:] if ended == "exited" else f"timed out after {timeout} s: {out[-3000:]}"
    ok = proc is not None and proc.returncode == 0 and (run_dir / "summary.json").is_file()
    status["seconds"] = time.monotonic() - started
    status["status"] = "done" if ok else "failed"
    if not ok:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "FAILED.txt").write_text(tail)
        status["error"] = tail.strip().splitlines()[-1] if tail.strip() else "no output"
        checkpoint = Path(entry["checkpoint"])
        if entry.get("resume") and checkpoint.is_file():  # a checkpoint that cannot resume: start over next time
            os.replace(checkpoint, checkpoint.with_suffix(".failed-resume"))
    write_json(status_path(sweep_dir, cid), status)
    return status


def _follow(proc: subprocess.Popen[str], *, timeout: float | None) -> str:
    """Wait for the cell's fl-sim: `exited`, `timeout` (stopped), or `orphaned` (stopped because this job's
    parent went away: a joblib or Submitit worker outlives a killed multirun, and its cell must not)."""
    parent = os.getppid()
    deadline = time.monotonic() + timeout if timeout else None
    while proc.poll() is None:
        if os.getppid() != parent or (deadline is not None and time.monotonic() > deadline):
            proc.terminate()  # fl-sim stops every process it started (SIGTERM), then exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return "orphaned" if os.getppid() != parent else "timeout"
        time.sleep(POLL)
    return "exited"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically (`fl.outputs.write_atomic`): a reader (fl-sweep's progress) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2))


def launch_cells(
    sweep_dir: Path,
    cells: list[str],
    launch: Launch,
    *,
    timeout: float | None,
    on_status: Callable[[str, dict[str, Any]], None],
) -> str | None:
    """Run `cells` (planned in sweep_dir/sweep.json) as one Hydra multirun; call `on_status(cid, status)` as each
    cell ends. Returns None, or the multirun's own failure (a launcher that could not run every cell)."""
    for cid in cells:  # a status from an earlier call is not this call's
        status_path(sweep_dir, cid).unlink(missing_ok=True)
    root = sweep_dir / LAUNCHER_DIR
    root.mkdir(parents=True, exist_ok=True)
    job = [f"sweep_dir={sweep_dir}", "cell=" + ",".join(cells)]
    job += [f"timeout={timeout}"] if timeout else []
    job += [f"cpus={cpus}"] if (cpus := launch.cell_cpus()) else []
    job += [f"ray_address={launch.ray_address}"] if launch.ray_address else []
    hydra_args = [f"hydra.sweep.dir={root}", "hydra.sweep.subdir=${cell}", "hydra.output_subdir=null"]
    cmd = [
        sys.executable,
        "-m",
        "simulations.launch",
        "-m",
        *job,
        *hydra_args,
        *launch.hydra_overrides(timeout=timeout),
    ]
    (root / "command.txt").write_text(shlex.join(cmd) + "\n")
    log_path = root / "multirun.log"
    seen: set[str] = set()

    def poll() -> None:
        for cid in cells:
            if cid not in seen and (status := read_status(sweep_dir, cid)) is not None:
                seen.add(cid)
                on_status(cid, status)

    with log_path.open("ab") as log:
        # the multirun dies with fl-sweep; its jobs' fl-sim processes die with their jobs
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        try:
            while proc.poll() is None:
                poll()
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    poll()
    if proc.returncode == 0 and seen == set(cells):
        return None
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return f"the {launch.launcher} launcher ended ({proc.returncode}) before this cell reported: {tail[0]} ({log_path})"


@hydra.main(config_path=None, config_name="cell_job", version_base="1.3")
def _cell_job(cfg: DictConfig) -> str:
    status = run_cell(
        Path(cfg.sweep_dir), str(cfg.cell), timeout=cfg.timeout, cpus=cfg.cpus, ray_address=cfg.ray_address
    )
    return str(status["status"])


def _stop_workers(signum: int, frame: object) -> None:
    """SIGTERM to the multirun (fl-sweep stopped: the kernel's signal, `die_with_parent`) goes on to its direct
    children, by PID: a launcher's idle or busy workers (joblib's, Submitit's local ones) would otherwise outlive
    it, and a busy one its cell; each cell's fl-sim stops what it started."""
    for child in psutil.Process().children():
        with suppress(psutil.NoSuchProcess):
            child.terminate()
    sys.exit(143)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_workers)
    _cell_job()
