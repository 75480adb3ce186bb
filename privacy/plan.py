"""A client's DP plan from the run's `PrivacySettings`: its local steps per round and its σ's (cached).

The server shows every client's plan up front (`fl.app.server_app`); each client plans for itself with the same
function and its own n, so both see the same numbers.
"""

from __future__ import annotations

from functools import lru_cache

from privacy.budget import DPPlan, plan_dp
from privacy.settings import PrivacySettings


def steps_per_round(settings: PrivacySettings, num_examples: int) -> int:
    """Local steps (logical batches) a client with `num_examples` examples takes in one round.

    Epochs, when set, count logical batches: ``max(1, round(epochs · n / logical_batch))``.
    """
    if settings.local_epochs is not None:
        return max(1, round(settings.local_epochs * num_examples / settings.logical_batch))
    if settings.local_steps is None:
        raise ValueError("Neither local epochs nor local steps are set; set train.local_steps or train.local_epochs.")
    return settings.local_steps


@lru_cache(maxsize=4096)
def client_plan(settings: PrivacySettings, num_examples: int) -> DPPlan:
    """The DP plan of a client with `num_examples` examples: σ for training (and σ_init for the
    `settings.init_releases` full-batch releases before round 1), planned to spend `target_epsilon` at its δ."""
    return plan_dp(
        target_epsilon=settings.target_epsilon,
        delta=settings.delta_for(num_examples),
        num_examples=num_examples,
        batch_size=settings.logical_batch,
        steps_per_round=steps_per_round(settings, num_examples),
        planned_rounds=settings.planned_rounds,
        max_grad_norm=settings.max_grad_norm,
        accountant=settings.accountant,
        init_steps=settings.init_releases,
        init_share=settings.init_share,
    )


def init_noise_multiplier(plan: DPPlan) -> float:
    """σ of every release before round 1: σ_init (from `init_share`), else the training σ."""
    return float(plan.init_noise_multiplier or plan.noise_multiplier)
