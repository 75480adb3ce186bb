"""Client-side differential privacy: Opacus DP-SGD, one accountant per client kept across rounds, budgets."""

from privacy.accountant import ACCOUNTANTS, ClientAccountant
from privacy.budget import DPPlan, default_delta, epsilon_after, plan_dp, sample_rate
from privacy.clipping import CLIPPINGS, per_layer_bounds
from privacy.engine import (
    GRAD_SAMPLE_MODES,
    make_private,
    noisy_gradient_sum,
    per_example_cross_entropy,
    release,
    unwrap,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIPPINGS",
    "GRAD_SAMPLE_MODES",
    "ClientAccountant",
    "DPPlan",
    "default_delta",
    "epsilon_after",
    "make_private",
    "noisy_gradient_sum",
    "per_example_cross_entropy",
    "per_layer_bounds",
    "plan_dp",
    "release",
    "sample_rate",
    "unwrap",
]
