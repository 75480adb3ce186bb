"""Console entry points. `fl-sim [overrides]`: one simulation, configured with Hydra.

A user's mistake (a bad value, an unknown key or group option, a missing file) ends `fl-sim`, `fl-sweep`
and `fl-report` with one line naming the field and the fix, and exit status 2; `FEDLORA_DEBUG=1` shows
the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fl import constants as K
from fl.app.config import CONFIG_DIR, register_configs, validate
from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env

register_configs()

DEBUG_ENV = "FEDLORA_DEBUG"  # set to 1 for the traceback of a user error
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    KeyError,
    HydraException,
    OmegaConfBaseException,
)
_NOISE = ("full_key:", "object_type=", "reference_type=", "provider=", "Config search path", "Set the environment")
T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """An exception (and its cause) as one line: Hydra's and OmegaConf's multi-line messages condensed."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
        msg = re.sub(r" ?To append to your config use \S+", "", " ".join(lines))  # a typo is likelier here
        if ":" in msg and "Available options" in msg:  # Hydra lists a group's options one per line
            head, _, options = msg.rpartition(":")
            msg = f"{head}: {', '.join(options.split())}"
        if msg and "$VALUE" not in msg and all(msg not in p for p in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return " — ".join(parts[:2]) or type(exc).__name__


def exit_on_user_error(prog: str, fn: Callable[[], T]) -> T:
    """Run `fn`; a user error prints `prog: <one line>` and exits 2 (re-raised when FEDLORA_DEBUG=1)."""
    try:
        return fn()
    except USER_ERRORS as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        _fail(prog, e)


def _fail(prog: str, e: BaseException) -> NoReturn:
    print(f"{prog}: error: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


def setup_logging() -> None:
    """Progress lines from this framework on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("fl", "strategies", "clients", "privacy", "simulations"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("flwr").propagate = False  # Flower has its own handler; Hydra's root one would repeat it
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations: 40 INFO lines per run


def resume_overrides(run_dir: str, cli: list[str]) -> list[str]:
    """The checkpoint's overrides, then any given now (e.g. more `sim.rounds`), then `resume=`; the run folder is
    the one resumed from, wherever the run first wrote (a moved or renamed folder keeps its outputs)."""
    from fl.checkpoint import Checkpoint

    ckpt = Checkpoint.load(run_dir)
    saved = [o for o in ckpt.overrides if not o.startswith("run_dir=")]
    extra = [o for o in cli if not o.startswith(("resume=", "run_dir="))]
    return [*saved, *extra, f"run_dir={run_dir}", f"resume={run_dir}"]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, a scheduler's stop (SLURM, Kubernetes, systemd), unwinds like Ctrl-C: same cleanup, exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _sim(cfg: DictConfig) -> float | None:
    # Errors are reported here, inside the job: Hydra would print its own line about the failed job first.
    # The return value is what a Hydra sweeper optimises (`fl-sim -m +tune=<method>`, Optuna): the run's final
    # accuracy on the validation split, never on the test split.
    return exit_on_user_error("fl-sim", lambda: _run(cfg))


def _run(cfg: DictConfig) -> float | None:
    validate(cfg)
    hc = HydraConfig.get()
    if cfg.resume:
        overrides = resume_overrides(str(cfg.resume), list(hc.overrides.task))
    else:
        overrides = [o for o in hc.overrides.task if not o.startswith("run_dir=")]
        overrides.append(f"run_dir={cfg.run_dir or hc.runtime.output_dir}")
    from fl.app.console import set_levels
    from fl.app.simulation import SimulationError, run_simulation

    set_levels(str(cfg.log_level))
    # SIGINT is not touched: a shell's background job (`fl-sim ... &` in a script) inherits it ignored, and
    # Python then leaves it ignored, as POSIX intends for background jobs. Stop those with SIGTERM.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_dir = run_simulation(overrides)
    except SimulationError as e:
        print(f"fl-sim: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        where = next(o.partition("=")[2] for o in reversed(overrides) if o.startswith("run_dir="))
        how = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"\nfl-sim: {how}; every process it started is stopped. Continue with: fl-sim resume={where}")
        sys.exit(143 if isinstance(e, _Terminated) else 130)
    print(f"\nDone. Outputs in {run_dir.resolve()}:")
    print("  config.yaml  metrics.jsonl  summary.json  adapter/  (load with PeftModel.from_pretrained)")
    return final_val_accuracy(run_dir)


def final_val_accuracy(run_dir: Path) -> float | None:
    """The last round's accuracy on the validation split (`data.val_size`), or None when the run has none."""
    rows = read_metrics(run_dir)
    return float(rows[-1][K.VAL_ACCURACY]) if rows and rows[-1].get(K.VAL_ACCURACY) is not None else None


def sim_main() -> None:
    """`fl-sim [overrides]`, e.g. `fl-sim strategy=fedit sim.num_clients=10 data.alpha=0.5`."""
    set_quiet_env()
    setup_logging()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing its own traceback
    exit_on_user_error("fl-sim", _sim)


if __name__ == "__main__":
    sim_main()
