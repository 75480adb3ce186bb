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
