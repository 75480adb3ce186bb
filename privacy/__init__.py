"""Client-side differential privacy: Opacus DP-SGD, per-client accountants kept across rounds, budgets."""

from privacy.accountant import ACCOUNTANTS, ClientAccountant
from privacy.budget import DPPlan, default_delta, plan_dp
from privacy.engine import make_private, noisy_gradient_sum, release

__all__ = [
    "ACCOUNTANTS",
    "ClientAccountant",
    "DPPlan",
    "default_delta",
    "make_private",
    "noisy_gradient_sum",
    "plan_dp",
    "release",
]
