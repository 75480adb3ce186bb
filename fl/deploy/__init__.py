"""The Deployment Runtime runner: credentials, a SuperLink and SuperNodes, warm ClientApps, and its bench.

Modules, imported one way (cli -> bench -> runner -> process, certs; warm_clientapp stands alone):

- `fl.deploy.certs`          CA, SuperLink certificate, SuperNode keys (`python -m fl.deploy.certs`).
- `fl.deploy.process`        the deployment's error type and `--node-config` values (the processes: fl.app.processes).
- `fl.deploy.runner`         `deploy`, `LocalFederation` and the steps an operator takes (docs/deploy.md).
- `fl.deploy.warm_clientapp` a ClientApp executor that keeps libraries loaded between messages.
- `fl.deploy.bench`          the same job in simulation and in deployment, seconds per round.
- `fl.deploy.cli`            `fl-deploy` / `python -m fl.deploy`.

Nothing outside this package knows about SuperNodes or certificates (fl-sim's own SuperLink is fl.app.simulation).
"""

from __future__ import annotations

import importlib
from typing import Any

# Re-exported lazily, so `python -m fl.deploy.certs` does not import the runner (and certs) first.
_EXPORTS = {
    "CONNECTION": "fl.deploy.runner",
    "LocalFederation": "fl.deploy.runner",
    "deploy": "fl.deploy.runner",
    "flower_exit_code": "fl.deploy.runner",
    "flwr_cli": "fl.deploy.runner",
    "prepare_overrides": "fl.deploy.runner",
    "main": "fl.deploy.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fl.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
