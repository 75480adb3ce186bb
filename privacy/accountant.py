"""One privacy accountant per client for the whole run, kept in the client's Flower `Context.state`.

A `ClientAccountant` wraps an Opacus accountant (PRV by default, or RDP). What composes is its history of
(noise multiplier, sample rate, steps) entries; `to_config_record` / `from_config_record` carry that
history between rounds (and processes) with a type tag, so ε composes over every round the client joins.
Flower's own Opacus example builds a fresh engine, hence a fresh accountant, every round and so reports
the ε of the last round only; this module exists so that never happens here.

The history is the mechanism, whatever accountant bounds it: `converted` re-accounts the same history with
another kind, which is how a run planned with one accountant continues a record kept by another (sound: each
accountant's ε is a valid upper bound for any history).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flwr.app import ConfigRecord
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

from privacy.orders import PRV_EPS_ERROR, History, prv_epsilon, rdp_epsilon

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
"""Accountant kinds by the name `privacy.accountant` takes."""

DEFAULT_ACCOUNTANT = "prv"
"""PRV (Gopi et al. 2021): in our regime (q 0.002–0.06, 9–750 steps, ε 1–8) its upper bound is within ~0.01 of
Google's PLD accountant, where RDP's conversion overstates ε by 15–70% (docs/privacy.md)."""

# state_dict keys (also the ConfigRecord keys): the type tag and the history as three parallel lists
KIND, SIGMAS, RATES, STEPS = "kind", "sigmas", "rates", "steps"


def accountant_class(kind: str) -> type[IAccountant]:
    """The Opacus accountant class registered under `kind`; a typo lists the valid names."""
    try:
        return ACCOUNTANTS[kind]
    except KeyError:
        raise ValueError(
            f"privacy.accountant={kind!r} is unknown. Set privacy.accountant to one of {sorted(ACCOUNTANTS)}."
        ) from None


class ClientAccountant:
    """A client's Opacus accountant whose state survives rounds and processes.

    Parameters
    ----------
    kind : str
        ``"prv"`` (privacy random variables, Gopi et al. 2021; the upper bound at `PRV_EPS_ERROR`) or ``"rdp"``
        (Rényi DP, Mironov 2017).

    Notes
    -----
    `opacus` is the underlying Opacus accountant: `privacy.engine.make_private` attaches the DP optimizer's
    step hook to this very object, so steps taken in training land in the persistent history. Opacus merges
    consecutive identical (σ, q) steps into one history entry; the ε is the same either way.
    """

    def __init__(self, kind: str = DEFAULT_ACCOUNTANT) -> None:
        self.kind = kind
        self.opacus: IAccountant = accountant_class(kind)()

    def __repr__(self) -> str:
        return f"ClientAccountant(kind={self.kind!r}, steps={self.steps})"

    @property
    def eps_error(self) -> float | None:
        """How far above the true ε this accountant's ε may lie by numerical error: `PRV_EPS_ERROR` for PRV; None
        for RDP (a closed-form bound, whose looseness is analytic, not numerical)."""
        return PRV_EPS_ERROR if self.kind == "prv" else None

    def converted(self, kind: str) -> ClientAccountant:
        """A new accountant of `kind` with this history: the same releases, accounted by `kind` (self if equal)."""
        if kind == self.kind:
            return self
        out = ClientAccountant(kind)
        out.opacus.history = list(self.opacus.history)
        return out

    @property
    def steps(self) -> int:
        """Noisy steps recorded so far (over all rounds)."""
        return sum(int(n) for _, _, n in self.opacus.history)

    def steps_at(self, sample_rate: float) -> int:
        """Noisy steps recorded at sample rate `sample_rate` (e.g. 1.0: full-batch releases, such as Fed-SB's init)."""
        return sum(int(n) for _, q, n in self.opacus.history if q == sample_rate)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` steps of the Poisson-subsampled Gaussian mechanism.

        Parameters
        ----------
        noise_multiplier : float
            σ: noise std divided by the clipping bound. 0 means no privacy (ε becomes infinite).
        sample_rate : float
            q in (0, 1]: each example's probability of being in a step's batch (1.0 = full batch).
        steps : int
            How many such steps (0 records nothing).
        """
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}.")
        if steps == 0:
            return
        history = self.opacus.history
        if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
            sigma, q, n = history.pop()  # the same merge Opacus' step() does, for `steps` steps at once
            history.append((sigma, q, n + steps))
        else:
            history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ: 0.0 before any step, inf if a step had no noise.

        PRV: Opacus' upper bound at `eps_error`. RDP: over Opacus' default orders, widened when the optimum sits at
        their edge (`privacy.orders`), so the ε is tight and Opacus' edge-order warning never fires. Cached by
        (kind, history, δ): a round asks for the same ε several times (the record, the budget, the reply)."""
        return history_epsilon(self.kind, tuple(self.opacus.history), delta)

    def optimal_order(self, delta: float) -> float | None:
        """The RDP order at which this history's ε (at δ) is reached; None before any step."""
        if not self.opacus.history:
            return None
        return rdp_epsilon(self.opacus.history, delta)[1]

    def would_exceed(
        self, *, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> bool:
        """Whether `steps` more steps at (σ, q) would take ε past `target_epsilon` (this one is unchanged)."""
        trial = copy.deepcopy(self)
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return trial.epsilon(delta) > target_epsilon + 1e-9

    def state_dict(self) -> dict[str, Any]:
        """The type tag and the history as parallel lists (floats, floats, ints)."""
        history = self.opacus.history
        return {
            KIND: self.kind,
            SIGMAS: [float(s) for s, _, _ in history],
            RATES: [float(q) for _, q, _ in history],
            STEPS: [int(n) for _, _, n in history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; refuses a state of another accountant kind or a malformed one."""
        if state.get(KIND) != self.kind:
            raise ValueError(
                f"Cannot load a {state.get(KIND)!r} accountant state into a {self.kind!r} accountant; "
                f"build ClientAccountant({state.get(KIND)!r}) or keep privacy.accountant unchanged within a run."
            )
        missing = [k for k in (SIGMAS, RATES, STEPS) if k not in state]
        if missing:
            raise ValueError(f"Accountant state is missing {missing}; it was not written by ClientAccountant.")
        sigmas, rates, steps = list(state[SIGMAS]), list(state[RATES]), list(state[STEPS])
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError(
                f"Accountant state has history lists of different lengths ({len(sigmas)}, {len(rates)}, "
                f"{len(steps)}); it is corrupt."
            )
        self.opacus.history = [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)]

    def to_config_record(self) -> ConfigRecord:
        """The state as a Flower ConfigRecord, for ``context.state[...]`` or a reply."""
        return ConfigRecord(self.state_dict())

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> ClientAccountant:
        """Rebuild an accountant from `to_config_record()`."""
        state = dict(record.items())
        acc = cls(str(state.get(KIND)))
        acc.load_state_dict(state)
        return acc


@lru_cache(maxsize=1024)
def history_epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of a (σ, q, steps) history at δ by accountant `kind`: 0.0 for none, inf if a step had no noise."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    accountant_class(kind)
    if kind == "rdp":
        return rdp_epsilon(history, delta)[0]
    return prv_epsilon(merged(history), delta)


def merged(history: History) -> list[tuple[float, float, int]]:
    """`history` with the steps of equal (σ, q) entries added up, first-seen order: the same composition (it
    commutes), fewer distributions for PRV to discretise."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(float(sigma), float(q))] = steps.get((float(sigma), float(q)), 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items() if n > 0]
