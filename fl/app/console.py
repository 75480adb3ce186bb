"""What a run prints: our progress and warnings; Flower's and Ray's own output only with `log_level=debug`.

The ServerApp runs in Flower's `flwr-simulation` process; what it prints goes to the run's log
(`.sim/logs/serverapp.log`), and fl-sim shows only what `fl.app.relay` carries: our progress and our loggers'
records. There, by default (`log_level=info`), Flower's logger shows errors only (no banner, no strategy tree)
and Ray starts with its own logging at ERROR and without forwarding the actors' output to the driver (each
actor would repeat our once-per-process warnings, e.g. "training in fp32", once per actor). The server
process still warns once per run: it evaluates with the same precision and model as the clients.
`log_level=debug` echoes the run's whole log too; `log_level=warning` hides our per-round lines.

A ServerApp that raises writes `error.log` in the run folder (`write_failure`: one line naming the exception
and where, then the traceback), and fl-sim prints that line (`read_failure`): the run's cause, in any process.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import traceback
from pathlib import Path
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


ERROR_LOG = "error.log"  # in the run folder: the ServerApp's failure, as one line, then its full traceback
_OUR_HOOKS = {
    "configure_train": "sending training",
    "aggregate_train": "aggregation",
    "configure_evaluate": "sending evaluation",
    "aggregate_evaluate": "evaluation replies",
    "central_evaluate": "central evaluation",
}


def failure_line(exc: BaseException) -> str:
    """``ValueError: <message> (<file>:<line> in <function>, round <r> <phase>)``: an exception as one line.

    The place is the innermost frame outside the Python installation (our code, or a test's), so a numpy error
    inside a defence names the defence; the round and phase come from Flower's strategy loop, when it ran.
    """
    message = " ".join(str(exc).split())
    if len(message) > 600:
        message = message[:600] + " …"
    head = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    where = failure_site(exc)
    return f"{head} ({where})" if where else head


def failure_site(exc: BaseException) -> str:
    """Where `exc` was raised, e.g. ``strategies/defences/median.py:40 in aggregate, round 1 aggregation``."""
    frames = [(f, line) for f, line in traceback.walk_tb(exc.__traceback__)]
    parts: list[str] = []
    ours = [(f, line) for f, line in frames if _is_ours(f.f_code.co_filename)]
    if ours:
        frame, line = ours[-1]
        parts.append(f"{_short_path(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}")
    for i, (frame, _) in enumerate(frames[:-1]):
        if frame.f_code.co_name == "start" and "flwr" in Path(frame.f_code.co_filename).parts:
            strategy = frame.f_locals.get("self")
            inner = getattr(strategy, "strategy", strategy)  # a wrapper (client-level DP) keeps the method's
            offset = int(getattr(inner, "round_offset", 0) or 0)
            server_round = int(frame.f_locals.get("current_round", 0)) + offset
            hook = frames[i + 1][0].f_code.co_name
            parts.append(f"round {server_round} {_OUR_HOOKS.get(hook, hook)}")
            break
    return ", ".join(parts)


def write_failure(run_dir: str | Path, exc: BaseException) -> Path:
    """Write `<run_dir>/error.log`: `failure_line(exc)`, then the full traceback (causes included)."""
    path = Path(run_dir) / ERROR_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    text = failure_line(exc) + "\n\n" + "".join(traceback.format_exception(exc))
    tmp = path.with_name(f".{ERROR_LOG}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_failure(run_dir: str | Path, since_ns: int = 0) -> str | None:
    """The one line of `<run_dir>/error.log` if it was written at or after `since_ns` (time.time_ns())."""
    path = Path(run_dir) / ERROR_LOG
    try:
        if path.stat().st_mtime_ns < since_ns:
            return None
        return path.read_text(errors="replace").split("\n", 1)[0].strip() or None
    except OSError:
        return None


def _is_ours(filename: str) -> bool:
    """Not Python's own library, not an installed package, not generated code."""
    path = Path(filename)
    if not path.is_absolute() or "site-packages" in path.parts or "dist-packages" in path.parts:
        return False
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib not in path.parents


def _short_path(filename: str) -> str:
    """`filename` relative to the import root it is under (``strategies/defences/median.py``), else as it is."""
    path = Path(filename)
    roots = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    under = [r for r in roots if r in path.resolve().parents]
    return str(path.resolve().relative_to(max(under, key=lambda r: len(r.parts)))) if under else filename
