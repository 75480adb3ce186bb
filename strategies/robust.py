"""The run's robust aggregation as the strategy applies it: `strategy.defence*` and `strategy.max_examples_weight`
read, checked (errors name the key) and applied each round before the method's rule (`strategies.defences` has
the rules and the references)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from privacy import ClientLevelSettings
from strategies.defences import EQUAL, MEDIAN, Defence, Kept, Krum, Median, MultiKrum, NormBound, TrimmedMean, keep_all
from strategies.screening import Reply
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

DEFENCES = ("none", "norm_bound", "trimmed_mean", "median", "krum", "multikrum")
"""`strategy.defence` values."""


def _require(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"strategy.{key}={value!r} is invalid: {fix}")


def _number_or(value: object, word: str, key: str) -> float | None:
    """`value` as a positive float, or None when it is `word`."""
    if str(value) == word:
        return None
    try:
        x = float(str(value))
    except ValueError:
        x = float("nan")
    _require(x > 0, key, value, f"use a number > 0 or {word}.")
    return x


def make_defence(
    name: str, *, bound: object = None, trim_fraction: float = 0.2, krum_f: int = 1, multikrum_m: int | None = None
) -> Defence:
    """The defence `name` with its parameters checked (errors name the `strategy.*` key)."""
    _require(name in DEFENCES, "defence", name, f"use one of {', '.join(DEFENCES)}.")
    if name == "norm_bound":
        _require(
            bound is not None, "defence_bound", bound, f"strategy.defence=norm_bound needs a bound > 0 or {MEDIAN}."
        )
        return NormBound(_number_or(bound, MEDIAN, "defence_bound"))
    if name == "trimmed_mean":
        _require(0 <= trim_fraction < 0.5, "trim_fraction", trim_fraction, "cut a fraction in [0, 0.5) at each end.")
        return TrimmedMean(float(trim_fraction))
    if name == "median":
        return Median()
    if name in ("krum", "multikrum"):
        _require(krum_f >= 0, "krum_f", krum_f, "f, the hostile clients tolerated, must be >= 0.")
        _require(multikrum_m is None or multikrum_m >= 1, "multikrum_m", multikrum_m, "keep at least 1 update.")
        return Krum(int(krum_f)) if name == "krum" else MultiKrum(int(krum_f), multikrum_m)
    return Defence()


class RobustAggregation:
    """The round's defence and the cap on claimed weight, as the strategy applies them (`strategy.defence*`,
    `strategy.max_examples_weight`). Parameters: `defence` (a `Defence`), `max_examples` (None | a number |
    ``median`` | ``equal``)."""

    def __init__(self, defence: Defence | None = None, max_examples: object = None) -> None:
        self.defence = defence or Defence()
        if max_examples is not None and str(max_examples) not in (MEDIAN, EQUAL):
            _number_or(max_examples, f"{MEDIAN} or {EQUAL}", "max_examples_weight")
        self.max_examples = max_examples

    @classmethod
    def from_config(cls, cfg: Any) -> RobustAggregation:
        """From a composed config; under client-level DP a norm bound is the DP clip `privacy.client.clip_norm`."""
        s = cfg.strategy
        bound = s.defence_bound
        client = ClientLevelSettings.from_config(cfg)
        if client.enabled and s.defence == "norm_bound":
            _require(
                bound is None or float(str(bound)) == float(client.clip_norm),
                "defence_bound",
                bound,
                f"under client-level DP the norm bound is privacy.client.clip_norm={client.clip_norm}: "
                "leave strategy.defence_bound unset.",
            )
            bound = client.clip_norm
        defence = make_defence(
            str(s.defence),
            bound=bound,
            trim_fraction=float(s.trim_fraction),
            krum_f=int(s.krum_f),
            multikrum_m=s.multikrum_m,
        )
        return cls(defence, s.max_examples_weight)

    @staticmethod
    def client_dp_problem(cfg: Any) -> str | None:
        """Why `strategy.defence` does not compose with client-level DP, or None."""
        if str(cfg.strategy.defence) in ("none", "norm_bound"):
            return None
        return (
            f"strategy.defence={cfg.strategy.defence} does not compose with client-level DP (privacy=client): the "
            "noise σC/m is calibrated to a mean of m updates clipped to C, and a median, trimmed mean or Krum pick "
            "moves by more than C/m when one client changes; use strategy.defence=norm_bound (the DP clip) or none."
        )

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
        if type(self.defence) is Defence:
            return keep_all(replies, weights)
        stats.defence["defence"] = self.defence.name
        kept = self.defence.apply(replies, weights, reference=reference, space=space, stats=stats)
        if "defence_clipped" in stats.defence:
            log.info("%s clipped partitions %s", self.defence.name, stats.defence["defence_clipped"])
        return kept

    @property
    def active(self) -> bool:
        """Whether a defence or a cap on claimed weight is on (the default has neither)."""
        return self.defence.name != "none" or self.max_examples is not None

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
