"""What every message of a round carries: the round, its phase, the run's overrides, the adapter kind and the
round's learning rate (`fl.schedule`), plus a method's own entries. The strategy decides who gets which arrays."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord

from fl import constants as K
from fl.schedule import round_lr


@dataclass(frozen=True)
class RoundConfig:
    """The ConfigRecord a strategy sends with each message.

    Parameters
    ----------
    overrides : sequence of str
        The Hydra overrides the run was composed from (a client composes the same config from them).
    adapter_kind : str
        The adapter every party builds (`fl.adapters.build_adapter`).
    lr, rounds, lr_schedule, warmup_rounds, lr_min
        The clients' peak learning rate and its schedule across `rounds` rounds (`fl.schedule.round_lr`).
    """

    overrides: Sequence[str] = field(default_factory=list)
    adapter_kind: str = "lora"
    lr: float = 1e-3
    rounds: int = 1
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    lr_min: float = 0.0

    def lr_at(self, server_round: int) -> float:
        """The clients' learning rate in (absolute) round `server_round`."""
        return round_lr(
            server_round,
            peak=self.lr,
            total_rounds=self.rounds,
            schedule=self.lr_schedule,
            warmup_rounds=self.warmup_rounds,
            lr_min=self.lr_min,
        )

    def record(self, server_round: int, phase: str, *extra: Mapping[str, Any]) -> ConfigRecord:
        """The ConfigRecord of one message; each mapping in `extra` (the method's entries, Flower's train
        config such as a DP wrapper's clipping norm) is added in order."""
        rec: dict[str, Any] = {
            K.SERVER_ROUND: server_round,
            K.PHASE: phase,
            K.OVERRIDES: json.dumps(list(self.overrides)),
            K.ADAPTER_KIND: self.adapter_kind,
        }
        if phase == K.PHASE_TRAIN:
            rec[K.LR] = self.lr_at(server_round)
        for entries in extra:
            rec.update(entries)
        return ConfigRecord(rec)

    def describe(self) -> str:
        """One line for the run's log."""
        return (
            f"adapter={self.adapter_kind} client lr={self.lr:g} ({self.lr_schedule}, {self.warmup_rounds} "
            f"warm-up rounds, floor {self.lr_min:g})"
        )
