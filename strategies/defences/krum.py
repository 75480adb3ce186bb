"""`strategy.defence=krum`: keep the one update with the lowest Krum score for f = `strategy.krum_f` hostile clients.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017, https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html.
The method's rule aggregates the kept replies as sent; the dropped ones count as `rejected`. Multi-Krum
(`strategies.defences.multikrum`) keeps more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fl.checks import require
from fl.config_defence import DefenceConfig
from strategies import robust_math as rm
from strategies.defences.base import Defence, Kept, UpdateSpace, keep_all
from strategies.screening import Reply
from strategies.stats import RoundStats

log = logging.getLogger(__name__)


@dataclass
class KrumConfig(DefenceConfig):
    """`strategy.defence=krum`'s field (Multi-Krum's too)."""

    krum_f: int = 1  # f, the hostile clients tolerated


class Krum(Defence):
    """Keep the `keep(n)` updates (Krum: 1) with the lowest Krum score for `krum_f` hostile clients."""

    name: ClassVar[str] = "krum"
    schema: ClassVar[type[DefenceConfig]] = KrumConfig
    client_dp_problem: ClassVar[str | None] = "a Krum pick moves by more than C/m when one client changes"

    def __init__(self, krum_f: int = 1) -> None:
        require(krum_f >= 0, "strategy.krum_f", krum_f, "f, the hostile clients tolerated, must be >= 0.")
        self.f = int(krum_f)

    def keep(self, n: int) -> int:
        """How many of `n` updates are kept."""
        return 1

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        n = len(replies)
        if n <= 2 * self.f + 2:
            log.warning(
                "%s: %d replies <= 2f + 2 = %d (strategy.krum_f=%d): its guarantee needs more",
                self.name,
                n,
                2 * self.f + 2,
                self.f,
            )
        scores = rm.krum_scores([space.update(r.state) for r in replies], self.f)
        chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[: self.keep(n)])
        dropped = [replies[i].partition for i in range(n) if i not in chosen]
        stats.rejected += len(dropped)
        stats.defence["defence_scores"] = {r.partition: float(s) for r, s in zip(replies, scores, strict=True)}
        stats.defence["defence_dropped"] = dropped
        if dropped:
            log.info(
                "%s dropped partitions %s (scores %s)",
                self.name,
                dropped,
                [float(scores[i]) for i in range(n) if i not in chosen],
            )
        return keep_all([replies[i] for i in chosen], [weights[i] for i in chosen])

    def describe(self) -> str:
        return f"{self.name} (f={self.f}, keep {self.kept()})"

    def kept(self) -> str:
        """How many are kept, in words (the summary's)."""
        return "1"
