"""`strategy.defence=norm_bound`: each client's update shrunk to ‖u_k‖ ≤ a bound.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019,
https://arxiv.org/abs/1911.07963. The bound is `strategy.defence_bound`: a number, or ``median`` (the median of
this round's update norms). In the product space the shrink is on the factors and bounds B·A − B̄·Ā exactly
(`robust_math.clip_scale`). Under client-level DP (`privacy=client`) the bound is the DP clip C: the wrapper
(`strategies.client_dp`) clips, this defence records its clips and does not clip a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np

from fl.checks import require
from fl.config_defence import DefenceConfig
from privacy import ClientLevelSettings
from strategies import robust_math as rm
from strategies.defences.base import MEDIAN, Defence, Kept, UpdateSpace, keep_all, number_or, record_clip
from strategies.screening import Reply
from strategies.stats import RoundStats


@dataclass
class NormBoundConfig(DefenceConfig):
    """`strategy.defence=norm_bound`'s field."""

    # a number, or median (the median of the round's update norms); under client-level DP: unset (the DP clip)
    defence_bound: str | None = None


class NormBound(Defence):
    """Shrink each update towards the round's global arrays to ‖u_k‖ ≤ bound.

    Parameters
    ----------
    bound : float or ``"median"``
        The L2 bound on one client's update (> 0), or the median of the round's update norms.
    dp_clip : bool
        The client-level DP wrapper's clip is the bound (`from_config` under `privacy=client`): keep every reply
        as the wrapper clipped it and record the wrapper's clips.
    """

    name: ClassVar[str] = "norm_bound"
    schema: ClassVar[type[DefenceConfig]] = NormBoundConfig
    client_dp_problem: ClassVar[str | None] = None

    def __init__(self, bound: float | str | None = None, *, dp_clip: bool = False) -> None:
        require(
            bound is not None,
            "strategy.defence_bound",
            bound,
            f"strategy.defence={self.name} needs a bound > 0 or {MEDIAN}.",
        )
        self.bound = number_or(bound, MEDIAN, "defence_bound")  # None: the round's median
        self.dp_clip = dp_clip
        self.history: list[float] = []  # the bound of every round so far (a running record; checkpointed)

    @classmethod
    def from_config(cls, cfg: Any) -> Self:
        """`strategy.defence_bound`; under client-level DP the bound is `privacy.client.clip_norm`."""
        bound = cfg.strategy.defence_bound
        client = ClientLevelSettings.from_config(cfg)
        if not client.enabled:
            return cls(bound)
        require(
            bound is None or number_or(bound, MEDIAN, "defence_bound") == client.clip_norm,
            "strategy.defence_bound",
            bound,
            f"under client-level DP the norm bound is privacy.client.clip_norm={client.clip_norm}: "
            "leave strategy.defence_bound unset.",
        )
        return cls(client.clip_norm, dp_clip=True)

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        if self.dp_clip or space.reference is None:
            return keep_all(replies, weights)
        norms = [rm.norm(space.update(r.state)) for r in replies]
        bound = float(np.median(norms)) if self.bound is None else self.bound
        self.history.append(bound)
        states = []
        for r in replies:
            clipped, scale, full = space.clip(r.state, bound)
            states.append(clipped)
            stats.defence.setdefault("defence_norms", {})[r.partition] = full
            if scale < 1.0:
                record_clip(stats, r.partition, scale)
        stats.defence["defence_bound"] = bound
        return keep_all(replies, weights, states)

    def dp_clip_problem(self, clip_norm: float) -> str | None:
        if self.dp_clip and self.bound == clip_norm:
            return None
        return (
            f"strategy.defence={self.name} with bound {self.bound} would clip again after the client-level DP clip "
            f"C={clip_norm}; build the strategy from the run's config (under privacy=client the bound is the clip)"
        )

    def on_dp_clip(self, stats: RoundStats, partition: int, scale: float) -> None:
        record_clip(stats, partition, scale)  # the DP clip is this defence's bound

    def describe(self) -> str:
        return f"{self.name} (bound {'median of the round' if self.bound is None else self.bound})"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))
