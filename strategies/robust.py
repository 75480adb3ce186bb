"""The run's robust aggregation as the strategy applies it: the cap on claimed weight
(`strategy.max_examples_weight`), then the registered defence `strategy.defence` (`strategies.defences`), each
round before the method's rule; errors name the key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from strategies.defences import DEFENCES, MEDIAN, Defence, Kept, NoDefence, get_defence, keep_all
from strategies.defences.base import number_or
from strategies.screening import Reply
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

EQUAL = "equal"
"""`strategy.max_examples_weight=equal`: every reply weighs 1."""

__all__ = ["DEFENCES", "EQUAL", "RobustAggregation"]


class RobustAggregation:
    """The round's defence and the cap on claimed weight, as the strategy applies them (`strategy.defence`,
    `strategy.max_examples_weight`). Parameters: `defence` (a `Defence`; None: none), `max_examples` (None | a
    number | ``median`` | ``equal``)."""

    def __init__(self, defence: Defence | None = None, max_examples: object = None) -> None:
        self.defence = defence or NoDefence()
        if max_examples is not None and str(max_examples) not in (MEDIAN, EQUAL):
            number_or(max_examples, f"{MEDIAN} or {EQUAL}", "max_examples_weight")
        self.max_examples = max_examples

    @classmethod
    def from_config(cls, cfg: Any) -> RobustAggregation:
        """From a composed config: the registered defence `strategy.defence`, built from its own fields."""
        s = cfg.strategy
        return cls(get_defence(str(s.defence)).from_config(cfg), s.max_examples_weight)

    @staticmethod
    def client_dp_problem(cfg: Any) -> str | None:
        """Why `strategy.defence` does not compose with client-level DP, or None (the defence's declaration)."""
        name = str(cfg.strategy.defence)
        problem = get_defence(name).client_dp_problem
        if problem is None:
            return None
        covered = " or ".join(n for n, cls in DEFENCES.items() if cls.client_dp_problem is None)
        return (
            f"strategy.defence={name} does not compose with client-level DP (privacy=client): the noise σC/m is "
            f"calibrated to a mean of m updates clipped to C, and {problem}; use strategy.defence={covered}."
        )

    def dp_clip_problem(self, clip_norm: float) -> str | None:
        """Why this strategy's defence, as built, cannot stand beside a client-level DP clip to `clip_norm`."""
        return self.defence.dp_clip_problem(clip_norm)

    def dp_clipped(self, stats: RoundStats, partition: int, scale: float) -> None:
        """The client-level DP wrapper shrank `partition`'s update by `scale`: the defence records it if it must."""
        self.defence.on_dp_clip(stats, partition, scale)

    def weights(self, replies: list[Reply], claimed: list[float], stats: RoundStats) -> list[float]:
        """The aggregation weights: the claimed counts, capped by `max_examples_weight`."""
        if self.max_examples is None:
            return claimed
        if str(self.max_examples) == EQUAL:
            return [1.0] * len(claimed)
        cap = float(np.median(claimed)) if str(self.max_examples) == MEDIAN else float(str(self.max_examples))
        capped = {r.partition: w for r, w in zip(replies, claimed, strict=True) if w > cap}
        if capped:
            stats.defence["defence_capped"] = capped
        return [min(w, cap) for w in claimed]

    def apply(
        self,
        replies: list[Reply],
        claimed: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        """Cap the weights, then the defence; what the method's rule aggregates."""
        weights = self.weights(replies, claimed, stats)
        if not self.defence.active:
            return keep_all(replies, weights)
        stats.defence["defence"] = self.defence.name
        kept = self.defence.apply(replies, weights, reference=reference, space=space, stats=stats)
        if "defence_clipped" in stats.defence:
            log.info("%s clipped partitions %s", self.defence.name, stats.defence["defence_clipped"])
        return kept

    @property
    def active(self) -> bool:
        """Whether a defence or a cap on claimed weight is on (the default has neither)."""
        return self.defence.active or self.max_examples is not None

    def describe(self) -> str:
        """One line for the strategy's summary."""
        return f"defence={self.defence.describe()}, max_examples_weight={self.max_examples}"

    def state_dict(self) -> dict[str, Any]:
        """The defence's state (checkpointed with the strategy's)."""
        return {"defence": self.defence.name, **self.defence.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` (a checkpoint of another defence is refused)."""
        if state and state.get("defence") != self.defence.name:
            raise ValueError(
                f"The checkpoint's defence is {state.get('defence')!r} but strategy.defence={self.defence.name}; "
                "resume with the run's own strategy.defence."
            )
        self.defence.load_state_dict(state)
