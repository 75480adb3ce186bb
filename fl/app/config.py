"""The run config as every party composes it: the ground's schemas and checks (`fl.config`), then the checks of
the layers above — each registered method validates its own fields (`from_config`), the optimiser name against
`clients.optim`'s registry, the privacy group with `privacy.config`. A bad value fails here, before any client
trains, with one line naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig

import strategies
from clients.attack import validate_attack
from clients.calibration import validate_calibration
from clients.drift import validate_drift
from clients.optim import OPTIMIZERS
from fl import config as ground
from fl.checks import require
from privacy import ClientLevelSettings
from privacy.config import validate_privacy

CONFIG_DIR = ground.CONFIG_DIR
split_overrides = ground.split_overrides


def register_configs() -> None:
    """Register every schema (the ground's and each registered method's: importing `strategies` adds them)."""
    ground.register_configs()


def compose(overrides: str | Sequence[str] | None = None) -> DictConfig:
    """Compose and validate the run config from Hydra overrides; the single entry point for every party.

    Parameters
    ----------
    overrides : str or list of str
        e.g. ``["strategy=fed_sb", "sim.num_clients=20"]`` or the same as one string.

    Returns
    -------
    DictConfig
        Read-only, validated by every layer (a misspelt key or a bad value raises ValueError naming it).
    """
    register_configs()
    cfg = ground.compose(split_overrides(overrides if isinstance(overrides, str) else list(overrides or [])))
    validate_layers(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """All checks of a config composed elsewhere (e.g. by `@hydra.main`)."""
    ground.validate(cfg)
    validate_layers(cfg)


def validate_layers(cfg: DictConfig) -> None:
    """The checks above the ground: the method's own fields, the optimiser, privacy."""
    t = cfg.train
    require(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"use one of {', '.join(OPTIMIZERS)}.")
    validate_privacy(cfg)
    validate_attack(cfg)
    validate_drift(cfg)
    validate_calibration(cfg)
    cls = strategies.get_strategy(str(cfg.strategy.name))
    # A throwaway build: FedAvg's notes (e.g. on fraction_evaluate) come with the run's own build.
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    try:
        cls.from_config(cfg, overrides=[], fixed={})  # the constructor checks the method's fields
    finally:
        flwr_log.setLevel(level)
    if ClientLevelSettings.from_config(cfg).enabled:
        problem = cls.client_level_dp_problem(cfg)
        if problem is not None:
            raise ValueError(problem)
