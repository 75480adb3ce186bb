"""Experiment tracking: `tracking=none|mlflow|tensorboard|wandb` (configs/tracking/), one module per backend.

Every backend gets the same four calls from the ServerApp: the flattened config as params once, every round's
metrics.jsonl row at step = round, then the run folder's adapter and plots as artifacts, then `finish`. A
sweep (`fl-sweep`) tracks its cells as one experiment, one run per cell, tagged with the cell's swept keys.
Each backend's package is an extra (`pip install fedlora[mlflow]`, `[tensorboard]`, `[wandb]`, or
`[tracking]` for all three); a missing one fails before the run starts, naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl.app.tracking.base import Tracker, plot_history

# backend name -> (module under fl.app.tracking, the PyPI package it needs, the extra that installs it)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "none": ("base", None, None),
    "mlflow": ("mlflow_backend", "mlflow", "mlflow"),
    "tensorboard": ("tensorboard_backend", "tensorboard", "tensorboard"),
    "wandb": ("wandb_backend", "wandb", "wandb"),
}

__all__ = ["BACKENDS", "Tracker", "check_backend", "flat_params", "make_tracker", "numeric_metrics", "plot_history"]


def check_backend(name: str) -> None:
    """Raise ValueError naming `tracking=` when `name` is unknown or its package is not installed."""
    if name not in BACKENDS:
        raise ValueError(f"tracking={name!r} is unknown; use one of {', '.join(BACKENDS)}.")
    _, package, extra = BACKENDS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"tracking={name} needs the {package} package: pip install 'fedlora[{extra}]' "
            "(or `bash dev.sh setup`, which installs every tracking backend)."
        )


def make_tracker(cfg: DictConfig, run_dir: Path) -> Tracker:
    """The run's tracker (`cfg.tracking.backend`); `Tracker` itself does nothing (tracking=none)."""
    name = str(cfg.tracking.backend)
    check_backend(name)
    if name == "none":
        return Tracker()
    module = importlib.import_module(f"fl.app.tracking.{BACKENDS[name][0]}")
    factory: Callable[..., Tracker] = module.make
    return factory(cfg.tracking, run_dir=Path(run_dir))


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to dotted keys (lists as their YAML-ish text)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl row (lists, strings and None left out; `round` is the step)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out
