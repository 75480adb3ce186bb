"""One privacy accountant per client for the whole run, kept in the client's Flower `Context.state`.

Wraps an Opacus accountant (RDP or PRV). Its history of (noise multiplier, sample rate, steps) is what
composes; `to_config_record`/`from_config_record` carry it between rounds (and processes) with a type
tag, so ε composes over every round the client joins — never a fresh accountant per round.
"""

from __future__ import annotations

import copy
from typing import Any

from flwr.app import ConfigRecord
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


class ClientAccountant:
    """A client's Opacus accountant with a state that survives rounds and processes.

    Parameters
    ----------
    kind : str
        ``rdp`` or ``prv`` (`privacy.accountant`).
    """

    def __init__(self, kind: str = "rdp") -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={kind!r} is unknown; use one of {sorted(ACCOUNTANTS)}.")
        self.kind = kind
        self.opacus: IAccountant = ACCOUNTANTS[kind]()

    @property
    def steps(self) -> int:
        """Noisy steps taken so far."""
        return sum(int(n) for _, _, n in self.opacus.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` steps of the subsampled Gaussian mechanism."""
        for _ in range(steps):
            self.opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ (0 before any step)."""
        if not self.opacus.history:
            return 0.0
        return float(self.opacus.get_epsilon(delta=delta))

    def would_exceed(
        self, *, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> bool:
        """Whether `steps` more steps would take ε past `target_epsilon` (computed on a copy)."""
        trial = copy.deepcopy(self)
        trial.opacus.history.append((noise_multiplier, sample_rate, steps))
        return trial.epsilon(delta) > target_epsilon + 1e-9

    def state_dict(self) -> dict[str, Any]:
        """Type tag + history."""
        hist = self.opacus.history
        return {
            "kind": self.kind,
            "sigmas": [float(s) for s, _, _ in hist],
            "rates": [float(q) for _, q, _ in hist],
            "steps": [int(n) for _, _, n in hist],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; refuses a state of another accountant kind."""
        if state.get("kind") != self.kind:
            raise ValueError(f"Cannot load a {state.get('kind')!r} accountant state into a {self.kind!r} accountant.")
        self.opacus.history = [
            (float(s), float(q), int(n))
            for s, q, n in zip(state["sigmas"], state["rates"], state["steps"], strict=True)
        ]

    def to_config_record(self) -> ConfigRecord:
        """The state as a Flower ConfigRecord (for `Context.state` or a message)."""
        return ConfigRecord(self.state_dict())

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> ClientAccountant:
        """Rebuild from `to_config_record()`."""
        state = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
        acc = cls(str(state["kind"]))
        acc.load_state_dict(state)
        return acc
