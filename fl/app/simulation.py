"""Run one job on Flower's Simulation Runtime the way Flower 1.41 supports: a local SuperLink and `flwr run`.

`run_simulation(overrides)` does what a user does by hand (README, "The plain Flower CLI"):

1. compose the config and check it, partitions included, before any process starts (the data only: the base
   model is loaded once on the server's side, by the ServerApp, which checks every rank against it);
2. start `flower-superlink --simulation` on a free loopback port, with FLWR_HOME, the Flower app and
   one log per process in the run folder's `.sim/`;
3. `flwr run <app> fl-sim --run-config <the overrides> --federation-config "num-supernodes=N ..."`: the
   SuperLink starts `flwr-simulation`, which runs the ServerApp and the ClientApps (Ray actors);
4. replay the ServerApp's console (`fl.app.relay`) until it closes, and the run's log into `.sim/logs/`;
5. stop every process it started, by PID and process group, also on an error or Ctrl-C: no SuperLink,
   `flwr-simulation` or Ray process outlives the call (and if fl-sim itself is killed, its SuperLink gets
   SIGTERM from the kernel and takes the rest with it: `fl.app.processes`);
6. a ServerApp that raised is reported by the one line of its `error.log` (exception, place, round).

With `sim.ray_address` (e.g. ``auto`` or ``127.0.0.1:6379``) `flwr-simulation` joins that Ray cluster
(RAY_ADDRESS) instead of starting one, and the cluster keeps running after the job. Without it a fresh local
Ray is started (RAY_ADDRESS=local), also when a `ray start` cluster happens to run on this machine.

With `sim.runtime=inline` steps 2-5 are replaced by the ServerApp's `run_server` in this process, its clients
called one after another (`fl.app.inline`): same config, same run folder, same metrics, no processes.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fl import constants as K
from fl.app.config import compose
from fl.app.console import ERROR_LOG, ray_init_logging, read_failure
from fl.app.flwr_cli import RunLog, start_superlink, submit_run, write_connection
from fl.app.processes import Processes, child_env, free_port, shielded
from fl.app.relay import PROGRESS_ENV, ProgressReader
from fl.app.server_app import check_server_config, default_run_dir
from fl.checkpoint import CHECKPOINT_FILE
from fl.data import client_partition
from fl.models import load_tokenizer
from fl.outputs import written_since
from fl.runtime_env import SIMULATION_ENV, set_quiet_env
from fl.tasks import get_task

log = logging.getLogger(__name__)
EXCEPTION_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception)): (.+)$", re.MULTILINE)


class SimulationError(RuntimeError):
    """The run ended without its summary: the ServerApp failed (the message has its exception and its log)."""


def server_error(log_text: str) -> str | None:
    """The ServerApp's exception (``ValueError: ...``) in a run's log: the first one, Flower re-raises it."""
    found = EXCEPTION_LINE.search(log_text)
    return f"{found.group(1)}: {found.group(2)}" if found else None


def superlink_cause(log_text: str) -> str | None:
    """Why the SuperLink ended a ServerApp that raised nothing: it stopped accepting the task's token once the
    task's heartbeats stopped (seen when fl-sim's processes were paused with SIGSTOP for 30 min, then resumed)."""
    if "task-token authentication failed" in log_text:
        return (
            "the SuperLink stopped accepting the ServerApp (Flower's task token expired: its heartbeats stopped, "
            "the processes were paused or starved past Flower's heartbeat timeout)"
        )
    return None


SIM_DIR = ".sim"  # inside the run folder: app/, flwr-home/, logs/, progress.jsonl
CONNECTION = "fl-sim"
DEFAULT_CLIENT_APP = "fl.app.client_app:app"
SERVER_APP = "fl.app.server_app:app"
POLL = 0.25  # seconds between looks at the progress file and the processes
FAILING_GRACE = 30.0  # seconds a failing ServerApp gets to record its exception and end


def app_project(path: Path, *, client_app: str = DEFAULT_CLIENT_APP) -> Path:
    """A Flower app for `flwr run`: a folder with only a pyproject.toml naming the ServerApp and ClientApp.

    Our packages are installed where `flwr-simulation` runs (this environment), so the app needs no code:
    `flwr run` on the repository would pack every file of it into the FAB on each run, for nothing.
    `client_app` (``module:attribute``) replaces the framework's ClientApp, e.g. a fault-injecting one.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=77"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        'name = "fedlora-sim"\n'
        'version = "0.1.0"\n'
        "dependencies = []  # the fedlora packages of the environment that runs fl-sim\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedlora"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{client_app}"\n\n'
        "[tool.flwr.app.config]\n"
        'overrides = ""\n'
    )
    return path


def federation_config(cfg: DictConfig) -> dict[str, Any]:
    """`flwr run --federation-config`: the SuperNodes, each client's Ray resources, Ray's own logging.

    Flower's simulation config takes whole CPUs per client (`client-resources-num-cpus` is an integer).
    """
    cpus = float(cfg.sim.client_cpus)
    if cpus < 1 or cpus != int(cpus):
        raise ValueError(
            f"sim.client_cpus={cpus:g}: Flower's Simulation Runtime reserves whole CPUs per client "
            "(client-resources-num-cpus is an integer); use 1, 2, ... (more clients than cores queue up)."
        )
    ray = ray_init_logging(str(cfg.log_level))
    fc: dict[str, Any] = {
        "num-supernodes": int(cfg.sim.num_clients),
        "client-resources-num-cpus": int(cpus),
        "client-resources-num-gpus": float(cfg.sim.client_gpus),
        "init-args-logging-level": logging.getLevelName(int(ray["logging_level"])),
        "init-args-log-to-driver": bool(ray["log_to_driver"]),
        "verbose": str(cfg.log_level) == "debug",
    }
    if not cfg.sim.ray_address:  # a cluster owns its resources; a local Ray gets this machine's cores
        fc["init-args-num-cpus"] = int(cfg.sim.cpus or os.cpu_count() or 1)
    return fc


def simulation_env(cfg: DictConfig, flwr_home: Path, progress_file: Path) -> dict[str, str]:
    """The SuperLink's environment, inherited by `flwr-simulation` and (on a local Ray) by its actors."""
    env = child_env(flwr_home, client_threads=_client_threads(cfg))  # torch threads per actor: its CPUs
    env[SIMULATION_ENV] = "1"  # simulated nodes keep the seeded noise (no Opacus secure_mode)
    env["RAY_ADDRESS"] = str(cfg.sim.ray_address or "local")
    # What this process can import, flwr-simulation and its actors can too (tests' ClientApps included).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env[PROGRESS_ENV] = str(progress_file)
    return env


def check_partitions(cfg: DictConfig) -> None:
    """Every simulated client takes a partition of the pool: a partitioning that cannot be made (e.g. Dirichlet
    α=0.1 over 20 clients with min_partition_size) must stop the run here with its message, not fail every client
    in every round of a run that then "finishes" untrained.

    Only the data is built (the tokenised pool, cached on disk for the processes after): the base model is loaded
    once on the server's side, by the ServerApp, which checks that every rank fits it before round 1.
    """
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = get_task(str(cfg.model.task)).build_data(cfg.data, tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    client_partition(task, cfg.data, pid=0, num_partitions=int(cfg.sim.num_clients), seed=int(cfg.seed))


def run_simulation(overrides: list[str], *, client_app: str | None = None) -> Path:
    """Compose the config from `overrides`, simulate `sim.num_clients` clients, return the run folder.

    `client_app` (``module:attribute``) replaces the framework's ClientApp (e.g. a fault-injecting one in
    tests). Every process started is stopped before returning, also on error or KeyboardInterrupt.
    """
    set_quiet_env()
    cfg = compose(overrides)  # fail fast, before any process starts
    if cfg.run_dir is None:
        overrides = [*overrides, f"run_dir={default_run_dir()}"]
        cfg = compose(overrides)
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    overrides = [o for o in overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    check_server_config(cfg)
    if cfg.sim.runtime == "inline":
        check_partitions(cfg)
        return _run_inline(cfg, run_dir, overrides, client_app)
    fed = federation_config(cfg)
    check_partitions(cfg)

    work = run_dir / SIM_DIR
    logs, flwr_home, progress_file = work / "logs", work / "flwr-home", work / "progress.jsonl"
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    progress_file.write_text("")
    env = simulation_env(cfg, flwr_home, progress_file)
    app = app_project(work / "app", client_app=client_app or DEFAULT_CLIENT_APP)
    procs = Processes()
    reader = ProgressReader(progress_file)
    summary, since = run_dir / K.SUMMARY_FILE, time.time_ns()
    try:
        address = start_superlink(
            procs, port=free_port(), env=env, log_path=logs / "superlink.log", certs=None, simulation=True
        )
        write_connection(flwr_home, name=CONNECTION, address=address, root_certificates=None)
        run_id = submit_run(app, overrides, connection=CONNECTION, env=env, federation_config=fed)
        log.debug("Submitted simulation run %d to the SuperLink on %s; logs in %s", run_id, address, logs)
        _follow(
            procs,
            reader,
            run_id,
            env=env,
            logs=logs,
            debug=str(cfg.log_level) == "debug",
            succeeded=lambda: written_since(summary, since),
        )
    finally:
        reader.close()
        with shielded():  # a second Ctrl-C cannot leave processes behind
            procs.stop()
    _raise_unless_finished(run_dir, since, logs)
    return run_dir


def _run_inline(cfg: DictConfig, run_dir: Path, overrides: list[str], client_app: str | None) -> Path:
    """`sim.runtime=inline` (fl.app.inline): the ServerApp and every ClientApp call in this process."""
    from fl.app.inline import run_inline

    app = None
    if client_app:  # ``module:attribute``, as Flower loads a ClientApp
        module, _, attr = client_app.partition(":")
        app = getattr(importlib.import_module(module), attr)
    since = time.time_ns()
    try:
        run_inline(overrides, run_dir, int(cfg.sim.num_clients), threads=_client_threads(cfg), client_app=app)
    except Exception:  # recorded in error.log by run_inline; said below in one line, as a Ray run's
        log.debug("The inline run failed", exc_info=True)
    _raise_unless_finished(run_dir, since, None)
    return run_dir


def _client_threads(cfg: DictConfig) -> int:
    """Torch threads of a simulated client: `train.threads`, else its reserved CPUs (`sim.client_cpus`)."""
    return max(1, int(cfg.train.threads or cfg.sim.client_cpus))


def _raise_unless_finished(run_dir: Path, since: int, logs: Path | None) -> None:
    """SimulationError naming why the run did not write its summary (the ServerApp's error.log, else Flower's and
    the SuperLink's logs under `logs`), with the resume command when a checkpoint exists."""
    summary = run_dir / K.SUMMARY_FILE
    if not written_since(summary, since):
        again = (
            f"; the run folder keeps what it wrote: after a fix, continue with fl-sim resume={run_dir}"
            if (run_dir / CHECKPOINT_FILE).is_file()
            else ""
        )
        cause = read_failure(run_dir, since)
        if cause is not None:  # the ServerApp's own record (fl.app.server_app.make_server_app)
            raise SimulationError(f"{cause}; traceback in {run_dir / ERROR_LOG}{again}")
        if logs is None:
            raise SimulationError(f"the run ended without writing {summary}{again}")
        log_path = logs / "serverapp.log"
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        link = logs / "superlink.log"
        expired = superlink_cause(link.read_text(errors="replace")) if link.is_file() else None
        why = server_error(text) or expired or "no exception in its log; it ends:\n" + text[-3000:]
        raise SimulationError(
            f"the run ended without writing {summary}: the ServerApp failed with {why} (log: {log_path}){again}"
        )


def _follow(
    procs: Processes,
    reader: ProgressReader,
    run_id: int,
    *,
    env: dict[str, str],
    logs: Path,
    debug: bool,
    succeeded: Callable[[], bool],
) -> None:
    """Replay the ServerApp's progress until it closes; stop early if the run or the SuperLink ended.

    A progress that closes without `succeeded()` is a failing ServerApp: it is given up to `FAILING_GRACE`
    seconds to end, so that its error.log and Flower's log of the exception are written before it is stopped.
    """
    watch = RunLog(procs, run_id, connection=CONNECTION, env=env, log_path=logs / "serverapp.log")
    shown = 0
    closed_at: float | None = None
    while True:
        reader.poll()
        if debug:  # Flower's and Ray's own lines, as the run writes them
            shown = _echo(watch.log_path, shown)
        if reader.closed:
            if succeeded():
                return
            closed_at = closed_at if closed_at is not None else time.monotonic()
            if time.monotonic() - closed_at > FAILING_GRACE:
                return
        if watch.finished():
            reader.poll()
            return
        time.sleep(POLL)


def _echo(path: Path, offset: int) -> int:
    if not path.is_file():
        return offset
    with path.open(errors="replace") as f:
        f.seek(offset)
        text = f.read()
    sys.stderr.write(text)
    return offset + len(text.encode("utf-8", errors="replace"))
