"""Environment every entry point sets before Flower or Ray start (offline machines, no telemetry)."""

from __future__ import annotations

import os

CLIENT_THREADS_ENV = "FEDLORA_CLIENT_THREADS"  # torch threads per ClientApp process (simulation)
SIMULATION_ENV = "FEDLORA_SIMULATION"  # "1" in a simulation's actors: nodes there are not deployment nodes

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def set_quiet_env() -> None:
    """Set the variables above unless the user already set them."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _ray_worker_cpus() -> float | None:
    """The CPUs Ray reserved for this process when it is a Ray worker (a simulated client's actor), else None.

    Actors on a cluster started with `ray start` do not inherit fl-sim's environment, so they learn what
    they are from Ray itself."""
    import sys

    ray = sys.modules.get("ray")  # only a process that already imported Ray can be its worker
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return None
        return float(ctx.get_assigned_resources().get("CPU", 0.0))
    except Exception:
        return None


def in_simulation() -> bool:
    """Whether this process is a simulated node: fl-sim's environment says so, or it is a Ray actor."""
    return os.environ.get(SIMULATION_ENV) == "1" or _ray_worker_cpus() is not None


def client_threads() -> int:
    """Torch threads for a ClientApp: fl-sim's CLIENT_THREADS_ENV, else the CPUs Ray reserved for it (0: leave)."""
    if value := int(os.environ.get(CLIENT_THREADS_ENV, "0") or 0):
        return value
    return int(_ray_worker_cpus() or 0)
