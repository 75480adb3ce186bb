"""What every defence shares: the `Defence` base (its hooks and declarations), what it hands the method's rule
(`Kept`), the round's update space it reads replies in (`UpdateSpace`), and the checks that name a config key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Self

import torch
from flwr.app import ArrayRecord

from fl.checks import require
from fl.config_defence import DefenceConfig
from fl.wire import from_record
from strategies import robust_math as rm
from strategies import robust_mixed as rmx
from strategies.screening import Reply
from strategies.stats import RoundStats

MEDIAN = "median"
"""The word for "the round's median" in `strategy.defence_bound` and `strategy.max_examples_weight`."""


def number_or(value: object, word: str, key: str) -> float | None:
    """`value` as a positive float, or None when it is `word` (errors name `strategy.<key>`)."""
    if str(value) == word:
        return None
    try:
        x = float(str(value))
    except ValueError:
        x = float("nan")
    require(x > 0, f"strategy.{key}", value, f"use a number > 0 or {word}.")
    return x


@dataclass
class Kept:
    """What a defence leaves for the method's rule."""

    replies: list[Reply]  # the replies that count as aggregated (their metrics are recorded)
    client_weights: list[float]  # their weights
    states: list[dict[str, torch.Tensor]]  # what the method aggregates: the replies' (clipped) states, or one state
    weights: list[float]


def keep_all(replies: list[Reply], weights: list[float], states: list[dict[str, torch.Tensor]] | None = None) -> Kept:
    """Every reply counts, with its own state or the matching one of `states` (e.g. clipped)."""
    return Kept(replies, weights, [r.state for r in replies] if states is None else states, weights)


def record_clip(stats: RoundStats, partition: int, scale: float) -> None:
    """Note that `partition`'s update was shrunk by `scale` this round (`defence_clipped`)."""
    stats.defence.setdefault("defence_clipped", {})[partition] = scale


class UpdateSpace:
    """A round's replies where the method aggregates them (`LoraStrategy.update_space`): the uniform-rank spaces of
    `strategies.robust_math` (``factors``, ``product``) or the mixed-rank ones of `strategies.robust_mixed`
    (``padded``, ``scaled_product``), measured from the round's global arrays. A defence reads replies only
    through it, so it works in every space."""

    def __init__(self, replies: Sequence[Reply], reference: ArrayRecord | None, space: str) -> None:
        self.name = space
        self.mixed = space in rmx.SPACES
        self._replies, self._record = replies, reference

    @cached_property
    def reference(self) -> dict[str, torch.Tensor] | None:
        """The round's global arrays (None when the caller has none: updates are then measured from zero)."""
        return from_record(self._record) if self._record is not None else None

    @cached_property
    def rank(self) -> int:
        """R, the server's rank, in the mixed-rank spaces; 0, unused, in the others."""
        return rmx.server_rank([r.state for r in self._replies], self.reference) if self.mixed else 0

    def update(self, state: rm.State) -> dict[str, torch.Tensor]:
        """A reply's update in this space (float64), against the reference or zero."""
        if self.mixed:
            return rmx.update(state, self.reference, space=self.name, rank=self.rank)
        ref = self.reference or {k: torch.zeros_like(v) for k, v in state.items()}
        return rm.update_vector(state, ref, space=self.name)

    def clip(self, state: dict[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float, float]:
        """(state', c, ‖u‖): a state whose update is c·u with ‖c·u‖ ≤ `bound` — `state` itself when c = 1."""
        if self.reference is None:
            raise ValueError("clipping measures updates from the round's global arrays; none were given.")
        if self.mixed:
            out, scale, full = rmx.clip(state, self.reference, bound=bound, space=self.name, rank=self.rank)
        else:
            out, scale, full = rm.clip(state, self.reference, bound=bound, space=self.name)
        return (state if scale == 1.0 else out), scale, full

    def coordinates(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a record of cut coordinates reads: the reply as sent, or its point when ranks differ."""
        return rmx.point(state, space=self.name, rank=self.rank) if self.mixed else state

    def robust_state(
        self, states: Sequence[dict[str, torch.Tensor]], rule: rm.Rule
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """(state, fit residual or None): `rule` coordinate-wise over the clients, as one state of this space."""
        if self.mixed:
            return rmx.robust_state(states, space=self.name, rank=self.rank, rule=rule)
        return rm.robust_state(states, space=self.name, rule=rule)


class Defence:
    """A robust aggregation rule, `strategy.defence=<name>`: one class, registered once by name
    (`strategies.defences.register`). It declares its fields (`schema`, read from `strategy.<field>`) and whether
    client-level DP covers it (`client_dp_problem`), and implements `defend` on a round's sound replies."""

    name: ClassVar[str] = ""
    """Its `strategy.defence` value (`register` checks it is the name registered)."""
    schema: ClassVar[type[DefenceConfig]] = DefenceConfig
    """Its fields, `strategy.<field>` (a dataclass extending `fl.config_defence.DefenceConfig`; none by default)."""
    client_dp_problem: ClassVar[str | None] = (
        "its result is not declared to move by at most C/m when one client changes"
    )
    """Why client-level DP (`privacy=client`), whose noise σC/m is calibrated to a mean of m updates clipped to C,
    does not cover this defence's result; None: it does (compose refuses the pair otherwise)."""
    active: ClassVar[bool] = True
    """Whether it acts (and is named in each round's record); only `none` does not."""

    @classmethod
    def from_config(cls, cfg: Any) -> Self:
        """Build from a composed run config: each field of `schema` is the constructor's keyword of that name."""
        return cls(**{key: cfg.strategy[key] for key in cls.schema.__dataclass_fields__})

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        """What the method's rule aggregates this round: `defend` on the replies in the method's `space`,
        measured from the round's global arrays `reference`; what it did goes into `stats.defence`."""
        return self.defend(replies, weights, UpdateSpace(replies, reference, space), stats)

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        """The rule (each defence's own): the replies that count and the states the method aggregates."""
        raise NotImplementedError

    def dp_clip_problem(self, clip_norm: float) -> str | None:
        """Why this defence, as built, cannot stand beside the client-level DP wrapper's clip to `clip_norm`
        (`strategies.client_dp`); None: it can."""
        return self.client_dp_problem

    def on_dp_clip(self, stats: RoundStats, partition: int, scale: float) -> None:
        """The client-level DP wrapper shrank `partition`'s update by `scale`. Default: nothing to record."""

    def describe(self) -> str:
        """One line for the strategy's summary."""
        return self.name

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds (checkpointed)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
