"""`strategy.defence=trimmed_mean`: the coordinate-wise mean after cutting `strategy.trim_fraction` at each end
(Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498); each round records the share of every client's
coordinates that was cut (`defence_trimmed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fl.checks import require
from fl.config_defence import DefenceConfig
from strategies import robust_math as rm
from strategies.defences.base import Kept, UpdateSpace
from strategies.defences.coordinate import CoordinateRule
from strategies.screening import Reply
from strategies.stats import RoundStats


@dataclass
class TrimmedMeanConfig(DefenceConfig):
    """`strategy.defence=trimmed_mean`'s field."""

    trim_fraction: float = 0.2  # the fraction cut at each end of every coordinate, in [0, 0.5)


class TrimmedMean(CoordinateRule):
    """The coordinate-wise mean after cutting int(`trim_fraction`·n) values at each end (Flower's `trim_mean`)."""

    name: ClassVar[str] = "trimmed_mean"
    schema: ClassVar[type[DefenceConfig]] = TrimmedMeanConfig

    def __init__(self, trim_fraction: float = 0.2) -> None:
        require(
            0 <= trim_fraction < 0.5, "strategy.trim_fraction", trim_fraction, "cut a fraction in [0, 0.5) at each end."
        )
        self.cut = float(trim_fraction)

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return rm.trimmed_mean(tensors, self.cut)

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        coords = [space.coordinates(r.state) for r in replies]
        cut, total = np.zeros(len(replies)), 0
        for key in coords[0]:  # per client, how much of it was cut
            cut += rm.trimmed_share([c[key] for c in coords], self.cut)
            total += coords[0][key].numel()
        stats.defence["defence_trimmed"] = {r.partition: float(c / total) for r, c in zip(replies, cut, strict=True)}
        return super().defend(replies, weights, space, stats)

    def describe(self) -> str:
        return f"{self.name} (cut {self.cut} at each end)"
