"""`strategy.defence=none`: every sound reply counts as sent (the default)."""

from __future__ import annotations

from typing import ClassVar

from strategies.defences.base import Defence, Kept, UpdateSpace, keep_all
from strategies.screening import Reply
from strategies.stats import RoundStats


class NoDefence(Defence):
    """No robust rule: the method aggregates every sound reply (client-level DP covers it: a plain mean)."""

    name: ClassVar[str] = "none"
    client_dp_problem: ClassVar[str | None] = None
    active: ClassVar[bool] = False

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        return keep_all(replies, weights)
