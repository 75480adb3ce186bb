"""PRV accounting, the default (`privacy.accountant=prv`): a PRV plan's ε lies between a tight recomputation and its
target, it needs less noise than RDP's, Fed-SB's q = 1 init releases and client-level DP at q = 1 stay upper bounds
of the exact Gaussian mechanism, and a node's ledger and accountant compose runs planned with different accountants
by re-accounting their (σ, q, steps) histories with one accountant."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    compute_safe_domain_size,
    discretize,
)
from scipy.optimize import brentq
from scipy.stats import norm

from fl import constants as K
from fl.config_privacy import ACCOUNTANT_KINDS
from privacy.accountant import ACCOUNTANTS, ClientAccountant
from privacy.budget import DPPlan, plan_dp
from privacy.client_level import client_level_epsilon
from privacy.ledger import LifetimeBudget, PrivacyLedger, ledger_decline
from privacy.orders import PRV_EPS_ERROR, rdp_epsilon
from privacy.session import ClientPrivacy
from privacy.settings import PrivacySettings

N, BATCH, STEPS, TARGET = 3600, 64, 40, 3.0  # q = 1/57 ≈ 0.0175, 40 steps: the map's regime, fast to account
DELTA = 1 / (10 * N)


def _plan(**kw: object) -> DPPlan:
    """The test federation's plan (N examples, batch 64, 40 steps, ε 3); keywords override."""
    args: dict[str, object] = dict(
        target_epsilon=TARGET,
        delta=DELTA,
        num_examples=N,
        batch_size=BATCH,
        steps_per_round=STEPS,
        planned_rounds=1,
        max_grad_norm=0.1,
    )
    return plan_dp(**{**args, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prv_plan() -> DPPlan:
    return _plan()


def _prv_bounds(history: list[tuple[float, float, int]], delta: float, eps_error: float) -> tuple[float, float]:
    """(lower, upper) bounds on ε from Opacus' PRV analysis functions at `eps_error` (Gopi et al. 2021: the true ε
    lies between them), built as `PRVAccountant` builds them, with δ error δ/1000."""
    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
    counts = [n for _, _, n in history]
    size = compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
    )
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
    lower, _, upper = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts).compute_epsilon(
        delta, delta_error, eps_error
    )
    return float(lower), float(upper)


def _exact_gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """The exact ε of `releases` full-batch Gaussian releases at noise multiplier σ: one Gaussian mechanism of
    μ = √k/σ (Balle & Wang 2018, Thm. 8; Dong, Roth & Su 2019)."""
    mu = math.sqrt(releases) / sigma
    return float(
        brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 500)
    )


def test_prv_is_the_default_and_the_accountant_names_agree() -> None:
    assert sorted(ACCOUNTANT_KINDS) == sorted(ACCOUNTANTS)
    assert ClientAccountant().kind == "prv" and PrivacySettings.__dataclass_fields__["accountant"].default is not None


def test_a_prv_plans_epsilon_is_between_a_tight_recomputation_and_its_target(prv_plan: DPPlan) -> None:
    acc = ClientAccountant()  # what the client records over the planned run
    for sigma, q, n in prv_plan.history():
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    reported = acc.epsilon(DELTA)
    lower, upper = _prv_bounds(prv_plan.history(), DELTA, eps_error=0.001)  # 10× finer than the accountant's
    ref = PRVAccountant()
    ref.history = prv_plan.history()
    assert reported == pytest.approx(ref.get_epsilon(delta=DELTA, eps_error=PRV_EPS_ERROR), rel=1e-12)
    assert lower <= upper <= reported <= TARGET and reported >= TARGET - 0.01
    assert reported - lower <= 2 * PRV_EPS_ERROR  # the stated error, not a loose bound
    assert prv_plan.rdp_epsilon is not None and prv_plan.rdp_epsilon > reported + 0.5  # RDP would say ~3.8
    plan_json = asdict(prv_plan)  # the row privacy_plan.json writes
    assert plan_json["accountant"] == "prv" and plan_json["eps_error"] == PRV_EPS_ERROR == 0.01
    assert "ε error ≤ 0.01" in prv_plan.describe()


def test_prv_plans_less_noise_than_rdp_for_the_same_target(prv_plan: DPPlan) -> None:
    rdp = _plan(accountant="rdp")
    assert rdp.eps_error is None and rdp.rdp_noise_multiplier == rdp.noise_multiplier
    assert prv_plan.rdp_noise_multiplier == rdp.noise_multiplier
    assert prv_plan.noise_multiplier < 0.93 * rdp.noise_multiplier  # measured: 9.6% less noise here
    assert rdp_epsilon(rdp.history(), DELTA)[0] <= TARGET  # both meet the target by their own accounting


def test_fed_sb_init_releases_at_q1_stay_above_the_exact_gaussian_and_within_their_share() -> None:
    plan = _plan(steps_per_round=10, init_steps=2, init_share=0.2)
    assert plan.init_noise_multiplier is not None
    init = ClientAccountant()
    init.step(noise_multiplier=plan.init_noise_multiplier, sample_rate=1.0, steps=2)
    exact = _exact_gaussian_epsilon(plan.init_noise_multiplier, 2, DELTA)
    assert exact <= init.epsilon(DELTA) <= min(0.2 * TARGET, exact + PRV_EPS_ERROR + 1e-3)
    whole = ClientAccountant()
    for sigma, q, n in plan.history():
        whole.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    assert init.epsilon(DELTA) < whole.epsilon(DELTA) <= TARGET


@pytest.mark.parametrize(("sigma", "rounds"), [(0.9, 5), (3.0, 1)])
def test_client_level_prv_at_q1_is_an_upper_bound_of_the_exact_gaussian(sigma: float, rounds: int) -> None:
    """10 of 10 clients every round (q = 1), few rounds: PRV's delicate corner. Its ε is above the exact one by at
    most its ε error; RDP's is above by far more."""
    exact = _exact_gaussian_epsilon(sigma, rounds, 0.01)
    prv, rdp = (
        client_level_epsilon(noise_multiplier=sigma, sample_rate=1.0, releases=rounds, delta=0.01, accountant=kind)
        for kind in ("prv", "rdp")
    )
    assert exact <= prv <= exact + PRV_EPS_ERROR + 1e-3 and prv < rdp


def test_the_ledger_composes_a_prv_run_after_an_rdp_run_by_one_accountant(tmp_path: Path) -> None:
    """An RDP-planned run, then a PRV-planned task on the same data: the ledger composes both runs' releases with
    the task's accountant (never an ε of one accountant added to an ε of another), and soundly: at least each
    part alone, at most what the RDP curves say."""
    ledger = PrivacyLedger(tmp_path / "ledger-tweets.json")
    earlier = [(0.9, 0.02, 20)]  # the RDP-planned run's releases, as its accountant recorded them
    ledger.record("run-1-partition-0", earlier)
    planned = [(0.8, 0.02, 20)]
    both = PRVAccountant()
    both.history = earlier + planned
    composed = ledger.spent(1e-4, extra=planned, accountant="prv")
    assert composed == pytest.approx(both.get_epsilon(delta=1e-4), rel=1e-12)
    alone = [ClientAccountant().converted("prv") for _ in range(2)]
    for acc, history in zip(alone, (earlier, planned), strict=True):
        acc.step(noise_multiplier=history[0][0], sample_rate=history[0][1], steps=history[0][2])
    assert max(a.epsilon(1e-4) for a in alone) < composed < sum(a.epsilon(1e-4) for a in alone)
    assert composed < ledger.spent(1e-4, extra=planned, accountant="rdp")
    budget = LifetimeBudget(path=ledger.path, epsilon=composed - 0.05)
    reason = ledger_decline(budget, key="run-2-partition-0", planned=planned, delta=1e-4, target_epsilon=1.0)
    assert reason is not None and "composed by prv" in reason and f"ε={composed:.4g}" in reason
    assert (
        ledger_decline(  # the same budget by RDP: it declines with RDP's (larger) figure
            budget, key="run-2-partition-0", planned=planned, delta=1e-4, target_epsilon=1.0, accountant="rdp"
        )
        != reason
    )


def test_a_record_kept_by_rdp_is_continued_by_a_prv_plan_with_every_release(tmp_path: Path) -> None:
    """A run resumed under the new default: the node's RDP record (Context.state) is re-accounted by PRV, the plan's
    accountant, with the same releases; nothing is dropped and the type tag still refuses a silent load."""
    settings = PrivacySettings(
        enabled=True,
        target_epsilon=8.0,
        delta=1e-3,
        max_grad_norm=1.0,
        accountant="prv",
        poisson_sampling=True,
        planned_rounds=2,
        logical_batch=16,
        physical_batch=16,
        local_steps=3,
        local_epochs=None,
    )
    old = ClientAccountant("rdp")
    old.step(noise_multiplier=1.1, sample_rate=0.25, steps=3)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a Message needs a run
    msg = Message(RecordDict({K.CONFIG: ConfigRecord({K.SERVER_ROUND: 2})}), 1, MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    context.state[K.STATE_PRIVACY] = old.to_config_record()
    session = ClientPrivacy(settings, msg=msg, context=context, partition_id=0, num_examples=256)
    acc = session.accountant
    assert acc.kind == "prv" and acc.opacus.history == old.opacus.history and acc.eps_error == PRV_EPS_ERROR
    assert acc.epsilon(1e-3) < old.epsilon(1e-3)
    with pytest.raises(ValueError, match="'rdp' accountant state into a 'prv'"):
        ClientAccountant("prv").load_state_dict(old.state_dict())
