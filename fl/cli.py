"""Console entry points. `fl-sim [overrides]`: one simulation, configured with Hydra."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl.config import CONFIG_DIR, register_configs, validate
from fl.runtime_env import set_quiet_env

register_configs()


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
    """The checkpoint's overrides, then any given now (e.g. more `sim.rounds`), then `resume=`."""
    from fl.checkpoint import Checkpoint

    ckpt = Checkpoint.load(run_dir)
    extra = [o for o in cli if not o.startswith(("resume=", "run_dir="))]
    return [*ckpt.overrides, *extra, f"resume={run_dir}"]


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _sim(cfg: DictConfig) -> None:
    validate(cfg)
    hc = HydraConfig.get()
    if cfg.resume:
        overrides = resume_overrides(str(cfg.resume), list(hc.overrides.task))
    else:
        overrides = [o for o in hc.overrides.task if not o.startswith("run_dir=")]
        overrides.append(f"run_dir={cfg.run_dir or hc.runtime.output_dir}")
    from fl.simulation import run_simulation

    run_dir = run_simulation(overrides)
    print(f"\nDone. Outputs in {run_dir.resolve()}:")
    print("  config.yaml  metrics.jsonl  summary.json  adapter/  (load with PeftModel.from_pretrained)")


def sim_main() -> None:
    """`fl-sim [overrides]`, e.g. `fl-sim strategy=fedit sim.num_clients=10 data.alpha=0.5`."""
    set_quiet_env()
    setup_logging()
    try:
        _sim()
    except ValueError as e:  # config values: the message names the field and the fix
        print(f"fl-sim: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sim_main()
