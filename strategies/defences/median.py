"""`strategy.defence=median`: the coordinate-wise median (Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from strategies import robust_math as rm
from strategies.defences.coordinate import CoordinateRule


class Median(CoordinateRule):
    """The coordinate-wise median over the round's clients (the mean of the middle two for an even count)."""

    name: ClassVar[str] = "median"

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return rm.coordinate_median(tensors)
