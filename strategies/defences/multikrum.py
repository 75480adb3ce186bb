"""`strategy.defence=multikrum`: keep the `strategy.multikrum_m` updates (default n − f) with the lowest Krum score
(Blanchard et al., NeurIPS 2017; `strategies.defences.krum`), which the method's rule then aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fl.checks import require
from fl.config_defence import DefenceConfig
from strategies.defences.krum import Krum, KrumConfig


@dataclass
class MultiKrumConfig(KrumConfig):
    """`strategy.defence=multikrum`'s fields."""

    multikrum_m: int | None = None  # updates kept (default n - f)


class MultiKrum(Krum):
    """Keep the `multikrum_m` updates (None: n − f) with the lowest Krum score for `krum_f` hostile clients."""

    name: ClassVar[str] = "multikrum"
    schema: ClassVar[type[DefenceConfig]] = MultiKrumConfig

    def __init__(self, krum_f: int = 1, multikrum_m: int | None = None) -> None:
        super().__init__(krum_f)
        require(multikrum_m is None or multikrum_m >= 1, "strategy.multikrum_m", multikrum_m, "keep at least 1 update.")
        self.m = None if multikrum_m is None else int(multikrum_m)

    def keep(self, n: int) -> int:
        return max(1, min(n, n - self.f if self.m is None else self.m))

    def kept(self) -> str:
        return "n - f" if self.m is None else str(self.m)
