"""What a run prints: our progress and warnings; Flower's and Ray's own output only with `log_level=debug`.

By default (`log_level=info`) Flower's logger shows errors only (no banner, no strategy tree, no
"`run_simulation` is deprecated"), Ray starts with its own logging at ERROR and without forwarding the
actors' output to the driver (each actor would repeat our once-per-process warnings, e.g. "training in fp32",
once per actor), and Ray's accelerator FutureWarning is not shown. The server process still warns once per
run: it evaluates with the same precision and model as the clients. `log_level=debug` shows all of it;
`log_level=warning` hides our per-round lines too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

OUR_LOGGERS = ("fl", "strategies", "clients", "privacy", "simulations")
# Third-party warnings the default console hides, as (message regex, category): each is about Flower's or
# Ray's future, not about this run.
HIDDEN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Tip: In future versions of Ray", FutureWarning),
    (r".*Pydantic v1 is deprecated", FutureWarning),
)
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


@contextlib.contextmanager
def quiet_third_party(log_level: str) -> Iterator[None]:
    """Within the block: the levels of `set_levels` and, unless `debug`, `HIDDEN_WARNINGS` not shown.

    Flower's logger is restored afterwards (tests and notebooks run several simulations in one process)."""
    flwr_logger = logging.getLogger("flwr")
    before = flwr_logger.level
    set_levels(log_level)
    try:
        with warnings.catch_warnings():
            if log_level != "debug":
                for message, category in HIDDEN_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        flwr_logger.setLevel(before)
