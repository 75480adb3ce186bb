"""What a run prints: our progress and warnings; Flower's and Ray's own output only with `log_level=debug`.

The ServerApp runs in Flower's `flwr-simulation` process; what it prints goes to the run's log
(`.sim/logs/serverapp.log`), and fl-sim shows only what `fl.app.relay` carries: our progress and our loggers'
records. There, by default (`log_level=info`), Flower's logger shows errors only (no banner, no strategy tree)
and Ray starts with its own logging at ERROR and without forwarding the actors' output to the driver (each
actor would repeat our once-per-process warnings, e.g. "training in fp32", once per actor). The server
process still warns once per run: it evaluates with the same precision and model as the clients.
`log_level=debug` echoes the run's whole log too; `log_level=warning` hides our per-round lines.
"""

from __future__ import annotations

import logging
from typing import Any

OUR_LOGGERS = ("fl", "strategies", "clients", "privacy", "simulations")
# Third-party loggers that speak at INFO about themselves, not the run (matplotlib: "generated new fontManager"
# on a fresh machine's first plot): shown with `log_level=debug` only.
CHATTY_LOGGERS = ("matplotlib",)


def python_level(log_level: str) -> int:
    """`log_level` (info | debug | warning) as a `logging` level."""
    return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[log_level]


def ray_init_logging(log_level: str) -> dict[str, Any]:
    """Extra `ray.init` arguments: Ray's own log level, and whether actors' output reaches this console."""
    if log_level == "debug":
        return {"logging_level": logging.INFO, "log_to_driver": True}
    return {"logging_level": logging.ERROR, "log_to_driver": False}


def set_levels(log_level: str) -> None:
    """Our loggers at `log_level`; Flower's at DEBUG with `debug`, else ERROR."""
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(python_level(log_level))
    flwr_level = logging.DEBUG if log_level == "debug" else logging.ERROR
    logging.getLogger("flwr").setLevel(flwr_level)
    logging.getLogger("ray").setLevel(logging.INFO if log_level == "debug" else logging.ERROR)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if log_level == "debug" else logging.WARNING)
