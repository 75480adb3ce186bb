"""Every DP mechanism: the run's settings and each client's plan, Opacus DP-SGD, Gaussian releases, one accountant
per client kept across rounds, budgets, the node's policy, client-level DP accounting. A client reaches them through
one front door, `privacy.session.ClientPrivacy`."""

from privacy.accountant import ACCOUNTANTS, ClientAccountant
from privacy.budget import DPPlan, default_delta, epsilon_after, plan_dp, sample_rate
from privacy.clipping import CLIPPINGS, per_layer_bounds
from privacy.engine import DPSGD, GRAD_SAMPLE_MODES, make_private, private_round, release, unwrap
from privacy.gaussian import gaussian_release, noisy_gradient_sum
from privacy.plan import client_plan, init_noise_multiplier, steps_per_round
from privacy.settings import ClientLevelSettings, PrivacySettings

__all__ = [
    "ACCOUNTANTS",
    "CLIPPINGS",
    "DPSGD",
    "GRAD_SAMPLE_MODES",
    "ClientAccountant",
    "ClientLevelSettings",
    "DPPlan",
    "PrivacySettings",
    "client_plan",
    "default_delta",
    "epsilon_after",
    "gaussian_release",
    "init_noise_multiplier",
    "make_private",
    "noisy_gradient_sum",
    "per_layer_bounds",
    "plan_dp",
    "private_round",
    "release",
    "sample_rate",
    "steps_per_round",
    "unwrap",
]
