"""Run one job on Flower's Simulation Runtime (Ray), in this process, and clean up after it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fl.app.config import compose
from fl.app.console import quiet_third_party, ray_init_logging
from fl.runtime_env import CLIENT_THREADS_ENV, SIMULATION_ENV, set_quiet_env

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)


def ray_init_args(address: str | None) -> dict[str, object]:
    """`ray.init` arguments for Flower's Ray backend: join `address` (a cluster owns its resources), or a
    local Ray sized to this machine's cores."""
    if address:
        return {"address": str(address)}
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def run_simulation(overrides: list[str], *, client_app: ClientApp | None = None) -> Path:
    """Compose the config from `overrides`, simulate `sim.num_clients` clients, return the run folder.

    The ServerApp runs in this process; ClientApps run in Ray actors (`sim.client_cpus` CPUs and
    `sim.client_gpus` GPUs each). With `sim.ray_address` (e.g. ``auto``) Flower's backend joins that
    existing Ray cluster instead of starting a local one.
    `client_app` replaces the framework's ClientApp (e.g. a fault-injecting one in tests).
    Ray is shut down before returning, also on error, so no Flower or Ray process outlives the call.
    """
    set_quiet_env()
    cfg = compose(overrides)  # fail fast, before Ray starts (a method client-level DP does not cover included)
    if cfg.run_dir is None:
        from fl.app.server_app import default_run_dir

        overrides = [*overrides, f"run_dir={default_run_dir()}"]
        cfg = compose(overrides)
    # Every simulated client takes a partition of the pool: a partitioning that cannot be made (e.g. Dirichlet
    # α=0.1 over 20 clients with min_partition_size) must stop the run here with its message, not fail
    # every client in every round of a run that then "finishes" untrained.
    from fl.app.workspace import get_workspace
    from fl.data import client_partition

    ws = get_workspace(list(overrides))  # the ServerApp below reuses it (same process, same overrides)
    client_partition(ws.task, cfg.data, pid=0, num_partitions=int(cfg.sim.num_clients), seed=int(cfg.seed))
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fl.app.client_app import app as default_client_app
    from fl.app.server_app import make_server_app

    # Each actor's torch gets as many threads as the CPUs Ray reserves for it (read by the ClientApp;
    # actors inherit this environment); without it every actor starts one thread per core.
    os.environ[SIMULATION_ENV] = "1"  # simulated nodes keep the seeded noise (no Opacus secure_mode)
    os.environ[CLIENT_THREADS_ENV] = str(max(1, int(cfg.train.threads or cfg.sim.client_cpus)))
    backend_config = {
        "client_resources": {"num_cpus": float(cfg.sim.client_cpus), "num_gpus": float(cfg.sim.client_gpus)},
        # Ray's own console output as `log_level` wants it (fl.app.console: actors' logs only with debug)
        "init_args": {**ray_init_args(cfg.sim.ray_address), **ray_init_logging(str(cfg.log_level))},
    }
    try:
        with quiet_third_party(str(cfg.log_level)):
            flwr_run_simulation(
                server_app=make_server_app(list(overrides)),
                client_app=client_app or default_client_app,
                num_supernodes=int(cfg.sim.num_clients),
                backend_config=backend_config,
                verbose_logging=str(cfg.log_level) == "debug",
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    run_dir = Path(str(cfg.run_dir))
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"The simulation ended without writing {run_dir / 'summary.json'}; see the log above.")
    return run_dir
