"""Plan a client's DP-SGD up front: the noise multiplier that keeps (ε, δ) at the end of the run.

The plan is conservative: it assumes the client is sampled in every planned round and takes all its
local steps, so the budget holds whatever the sampling does. Fed-SB's privatised init gradient (one
full-batch Gaussian mechanism, sample rate 1, same σ) is part of the plan when asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from privacy.accountant import ClientAccountant


@dataclass(frozen=True)
class DPPlan:
    """A client's DP-SGD settings for the whole run."""

    noise_multiplier: float
    sample_rate: float  # Poisson sampling probability per example per step
    steps_per_round: int
    planned_rounds: int
    init_steps: int  # full-batch steps before round 1 (Fed-SB init: 1)
    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str

    def describe(self) -> str:
        """One line for logs."""
        return (
            f"DP-SGD: noise multiplier σ={self.noise_multiplier:.3f}, sample rate q={self.sample_rate:.4g}, "
            f"{self.steps_per_round} steps/round × {self.planned_rounds} rounds"
            f"{f' + {self.init_steps} full-batch init step' if self.init_steps else ''}, "
            f"clip C={self.max_grad_norm}, planned (ε={self.target_epsilon}, δ={self.delta:.2e}), {self.accountant}"
        )


def default_delta(num_examples: int) -> float:
    """δ = 1 / (10 n): below 1/n, as DP-SGD's guarantee needs."""
    return 1.0 / (10.0 * num_examples)


def _check(ok: bool, field: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: {fix}")


def _epsilon(sigma: float, *, q: float, steps: int, init_steps: int, delta: float, accountant: str) -> float:
    acc = ClientAccountant(accountant)
    if init_steps:
        acc.step(noise_multiplier=sigma, sample_rate=1.0, steps=init_steps)
    acc.opacus.history.append((sigma, q, steps))
    return acc.epsilon(delta)


def plan_dp(
    *,
    target_epsilon: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    steps_per_round: int,
    planned_rounds: int,
    max_grad_norm: float,
    accountant: str = "rdp",
    init_steps: int = 0,
) -> DPPlan:
    """The noise multiplier for (ε, δ) after `planned_rounds` × `steps_per_round` steps (+ init steps).

    The sample rate matches Opacus' DPDataLoader: q = 1 / ceil(n / batch_size).
    """
    _check(target_epsilon > 0, "privacy.target_epsilon", target_epsilon, "must be > 0 (or use privacy=off).")
    _check(0 < delta < 1, "privacy.delta", delta, "must be in (0, 1), below 1/n_k.")
    _check(num_examples > 0, "num_examples", num_examples, "a client needs data to train privately.")
    _check(batch_size > 0, "train.batch_size", batch_size, "must be >= 1.")
    _check(steps_per_round > 0, "train.local_steps", steps_per_round, "must be >= 1.")
    _check(planned_rounds > 0, "privacy.planned_rounds", planned_rounds, "must be >= 1.")
    _check(max_grad_norm > 0, "privacy.max_grad_norm", max_grad_norm, "must be > 0.")
    q = 1.0 / math.ceil(num_examples / batch_size)
    steps = steps_per_round * planned_rounds
    if init_steps == 0:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant=accountant
        )
    else:  # bisection: the init step at q=1 and the training steps share one σ and one budget
        lo, hi = 0.1, 1.0
        while (
            _epsilon(hi, q=q, steps=steps, init_steps=init_steps, delta=delta, accountant=accountant) > target_epsilon
        ):
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(f"privacy.target_epsilon={target_epsilon} cannot be met; raise it.")
        for _ in range(40):
            mid = (lo + hi) / 2
            eps = _epsilon(mid, q=q, steps=steps, init_steps=init_steps, delta=delta, accountant=accountant)
            lo, hi = (mid, hi) if eps > target_epsilon else (lo, mid)
        sigma = hi
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=q,
        steps_per_round=steps_per_round,
        planned_rounds=planned_rounds,
        init_steps=init_steps,
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
    )
