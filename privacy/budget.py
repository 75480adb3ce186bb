"""Plan a client's DP-SGD up front: the noise multipliers that keep (ε, δ) at the end of the run.

The plan is conservative: it assumes the client is sampled in every planned round and takes all its
local steps, so the budget holds whatever the client sampling does. Fed-SB's privatised init releases
(full-batch Gaussian mechanisms, sample rate 1) are part of the plan, with a noise multiplier of their own:
`init_share` of ε fixes σ_init (the init releases alone would cost that share), then σ for training is the
smallest whose composition with them — one accountant, PRV/RDP composition — stays within ε. Without a share
(``init_share=None``) init and training use one σ, which the init's q = 1 then dominates.

PRV (the default) plans a smaller σ than RDP for the same (ε, δ): 7–12% smaller in our regime (q 0.002–0.045,
9–300 steps, ε = 3), because RDP's conversion to (ε, δ) is loose there. The RDP plan is made first either way: it
is the comparison the plan records (`rdp_noise_multiplier`) and the bracket PRV's search starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fl.checks import require
from privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT, ClientAccountant
from privacy.orders import PRV_EPS_ERROR, quiet_orders, rdp_epsilon

EPSILON_TOLERANCE = 0.01
"""The plan's ε lies in [target − this, target] (the bisection tolerance Opacus uses too)."""

MAX_NOISE_MULTIPLIER = 1e6


@dataclass(frozen=True)
class DPPlan:
    """A client's DP-SGD settings for the whole run (from `plan_dp`)."""

    noise_multiplier: float  # σ: Gaussian noise std / max_grad_norm
    sample_rate: float  # q: Poisson sampling probability of each example per step
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    max_grad_norm: float  # C: per-example L2 clipping bound
    accountant: str  # "prv" | "rdp": what planned σ and accounts every step
    init_steps: int = 0  # full-batch (q = 1) releases before training, e.g. Fed-SB's init gradient(s)
    init_noise_multiplier: float | None = None  # σ_init of those releases (None without any)
    init_share: float | None = None  # fraction of ε σ_init was chosen for; None: σ_init = σ
    batch_size: int | None = None  # the logical batch q was planned for
    num_examples: int = 0  # n, the client's examples
    dp_steps: int = 0  # noisy training steps the plan charges: steps_per_round × planned_rounds
    examples_seen: int = 0  # expected examples through the model over those steps: dp_steps · q · n
    rdp_order: float | None = None  # the optimal RDP order of the planned run's ε (also under PRV: for comparison)
    rdp_max_order: float | None = None  # the largest order searched (widened past Opacus' 63 when needed)
    eps_error: float | None = None  # PRV: its ε is an upper bound within this of the true ε; None under RDP
    rdp_noise_multiplier: float | None = None  # σ the RDP accountant plans for the same target (for comparison)
    rdp_epsilon: float | None = None  # RDP's ε of this plan's whole run (≥ the plan's ε under PRV)

    @property
    def extra_full_batch_steps(self) -> int:
        """Old name of `init_steps`."""
        return self.init_steps

    def history(self) -> list[tuple[float, float, int]]:
        """The (σ, q, steps) entries the whole planned run charges, in order."""
        out: list[tuple[float, float, int]] = []
        if self.init_steps:
            out.append((float(self.init_noise_multiplier or self.noise_multiplier), 1.0, self.init_steps))
        out.append((self.noise_multiplier, self.sample_rate, self.steps_per_round * self.planned_rounds))
        return out

    def describe(self) -> str:
        """One line for logs: σ's, q, steps, planned (ε, δ)."""
        init = (
            f" + {self.init_steps} full-batch init release(s) at σ_init={self.init_noise_multiplier:.4g}"
            if self.init_steps
            else ""
        )
        tight = (
            f" (ε error ≤ {self.eps_error:g}; RDP would plan σ={self.rdp_noise_multiplier:.4g})"
            if self.eps_error is not None and self.rdp_noise_multiplier is not None
            else ""
        )
        return (
            f"DP-SGD: σ={self.noise_multiplier:.4g}, q={self.sample_rate:.4g}, "
            f"{self.steps_per_round} steps/round × {self.planned_rounds} rounds{init}, C={self.max_grad_norm:g}, "
            f"planned (ε={self.target_epsilon:g}, δ={self.delta:.2e}) by {self.accountant}{tight}"
        )


def default_delta(num_examples: int) -> float:
    """δ = 1 / (10 n): a tenth of 1/n, the usual ceiling for a meaningful (ε, δ) guarantee over n examples."""
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}. A client needs data to train privately.")
    return 1.0 / (10.0 * num_examples)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The q Opacus charges per step for a loader of `batch_size` over `num_examples`, to the last bit.

    Opacus samples each example with q₀ = 1 / ceil(n / batch_size) but charges ``1 / len(dp_loader)``, and
    its Poisson loader has ``int(1 / q₀)`` batches — 92 instead of 93 when 1 / (1 / 93) rounds to
    92.999… (312 of the first 5,000 batch counts). It then charges 1 / (k − 1): slightly more than the
    sampling really costs, so the guarantee holds, but a plan made with q₀ would run out of budget a few
    steps early. Plan with what is charged. ≤ batch_size / (n − batch_size); 1.0 when batch_size ≥ n.
    """
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / int(1.0 / (1.0 / batches))  # Opacus: UniformWithReplacementSampler(steps=int(1 / q₀))


def epsilon_after(
    noise_multiplier: float,
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    extra_full_batch_steps: int = 0,
    init_noise_multiplier: float | None = None,
) -> float:
    """ε after `extra_full_batch_steps` steps at q = 1 (σ_init, default σ) and `steps` steps at `sample_rate`."""
    acc = ClientAccountant(accountant)
    init_sigma = noise_multiplier if init_noise_multiplier is None else init_noise_multiplier
    acc.step(noise_multiplier=init_sigma, sample_rate=1.0, steps=extra_full_batch_steps)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
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
    accountant: str = DEFAULT_ACCOUNTANT,
    extra_full_batch_steps: int = 0,
    init_steps: int | None = None,
    init_share: float | None = None,
) -> DPPlan:
    """The noise multiplier that spends (ε, δ) exactly by the end of the planned run.

    Parameters
    ----------
    target_epsilon, delta : float
        The client's budget.
    num_examples : int
        Examples in the client's partition (n).
    batch_size : int
        Expected batch size; q ≈ 1 / ceil(n / batch_size), exactly as Opacus charges it (see `sample_rate`).
    steps_per_round, planned_rounds : int
        Training steps = steps_per_round × planned_rounds, as if the client joined every round.
    max_grad_norm : float
        Per-example clipping bound C (recorded in the plan).
    accountant : str
        ``"prv"`` (default: Opacus' PRV upper bound at `PRV_EPS_ERROR`) or ``"rdp"``.
    extra_full_batch_steps : int
        Full-batch Gaussian steps with the same σ before training (Fed-SB's privatised init releases: 1
        dense, 2 + 2·power iterations sketched). With > 0, σ is found by bisection so that init + training
        fit the target together.
    init_steps : int, optional
        Alias of `extra_full_batch_steps`.
    init_share : float, optional
        In (0, 1): σ_init is the smallest σ whose init releases alone cost ≤ init_share · ε; σ for training is
        then the smallest whose composition with them stays ≤ ε. None: one σ for both.

    Returns
    -------
    DPPlan
        σ (and σ_init) with the composed ε in [target − 0.01, target].
    """
    if init_steps is not None:
        if extra_full_batch_steps not in (0, init_steps):
            raise ValueError("Pass extra_full_batch_steps or its old name init_steps, not both.")
        extra_full_batch_steps = init_steps
    require(
        target_epsilon > 0,
        "privacy.target_epsilon",
        target_epsilon,
        "Set privacy.target_epsilon=3.0 or privacy=off.",
        must="> 0",
    )
    require(0 < delta < 1, "privacy.delta", delta, "Use a value below 1/n, or null for the default.", must="in (0, 1)")
    require(num_examples > 0, "num_examples", num_examples, "A client needs data to train privately.", must="> 0")
    require(batch_size > 0, "train.batch_size", batch_size, "Set train.batch_size=16.", must="> 0")
    require(steps_per_round > 0, "steps_per_round", steps_per_round, "Set train.local_steps >= 1.", must="> 0")
    require(planned_rounds > 0, "privacy.planned_rounds", planned_rounds, "Set it to the rounds to run.", must="> 0")
    require(max_grad_norm > 0, "privacy.max_grad_norm", max_grad_norm, "Set privacy.max_grad_norm=1.0.", must="> 0")
    require(accountant in ACCOUNTANTS, "privacy.accountant", accountant, "", must=f"one of {sorted(ACCOUNTANTS)}")
    require(
        extra_full_batch_steps >= 0,
        "extra_full_batch_steps",
        extra_full_batch_steps,
        "Use the number of Fed-SB init releases (1 dense, 2 + 2 per power iteration for the sketch).",
        must=">= 0",
    )
    require(
        init_share is None or 0 < init_share < 1,
        "privacy.init_share",
        init_share,
        "Set privacy.init_share=0.1 (a tenth of ε for Fed-SB's init), or null for one σ.",
        must="in (0, 1) or null",
    )
    q = sample_rate(num_examples, batch_size)
    steps = steps_per_round * planned_rounds
    rdp: DPPlan | None = None  # RDP's plan: the comparison, and where PRV's search starts
    if accountant != "rdp":
        rdp = plan_dp(
            target_epsilon=target_epsilon,
            delta=delta,
            num_examples=num_examples,
            batch_size=batch_size,
            steps_per_round=steps_per_round,
            planned_rounds=planned_rounds,
            max_grad_norm=max_grad_norm,
            accountant="rdp",
            init_steps=extra_full_batch_steps,
            init_share=init_share,
        )
    init_sigma: float | None = None
    if extra_full_batch_steps and init_share is not None:
        init_sigma = smallest_noise_multiplier(
            lambda s: epsilon_after(
                s,
                sample_rate=1.0,
                steps=0,
                delta=delta,
                accountant=accountant,
                extra_full_batch_steps=extra_full_batch_steps,
            ),
            init_share * target_epsilon,
            start=rdp.init_noise_multiplier if rdp is not None else None,
        )
    with quiet_orders():  # the search's small σ candidates put the optimum at the edge; the plan's does not
        sigma = smallest_noise_multiplier(
            lambda s: epsilon_after(
                s,
                sample_rate=q,
                steps=steps,
                delta=delta,
                accountant=accountant,
                extra_full_batch_steps=extra_full_batch_steps,
                init_noise_multiplier=init_sigma,
            ),
            target_epsilon,
            start=rdp.noise_multiplier if rdp is not None else None,
        )
    if extra_full_batch_steps and init_sigma is None:
        init_sigma = sigma
    history = [(float(init_sigma or sigma), 1.0, extra_full_batch_steps), (float(sigma), q, steps)]
    rdp_eps, order, orders = rdp_epsilon([h for h in history if h[2]], delta)
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=q,
        steps_per_round=steps_per_round,
        planned_rounds=planned_rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        init_steps=extra_full_batch_steps,
        init_noise_multiplier=float(init_sigma) if init_sigma is not None else None,
        init_share=init_share if extra_full_batch_steps else None,
        batch_size=batch_size,
        num_examples=num_examples,
        dp_steps=steps,
        examples_seen=round(steps * q * num_examples),
        rdp_order=order,
        rdp_max_order=max(orders),
        eps_error=PRV_EPS_ERROR if accountant == "prv" else None,
        rdp_noise_multiplier=float(sigma) if rdp is None else rdp.noise_multiplier,
        rdp_epsilon=rdp_eps,
    )


def smallest_noise_multiplier(
    eps: Callable[[float], float], target_epsilon: float, *, start: float | None = None
) -> float:
    """The smallest σ (to `EPSILON_TOLERANCE` in ε) with eps(σ) ≤ target; ε falls as σ grows.

    Without `start`, bisection from [0, 1], doubling the top until it meets the target (RDP: ~0.05 s an ε).
    With `start` (RDP's σ, for PRV) the bracket is [0.85·start, start], widened if it does not hold the target, and
    narrowed by regula falsi on log ε (Illinois: ε is near a power of σ, so 3–5 PRV evaluations instead of a
    bisection's 8–12). Opacus' `get_noise_multiplier(accountant="prv")` would do the job for a plan of one (σ, q)
    but bisects [0, 20] (~12 PRV evaluations at 0.1–0.5 s each: 4–6 s a plan on 2 cores, and every client plans),
    and cannot compose Fed-SB's init releases at their own σ_init. Client-level DP's PRV plan uses it too
    (`privacy.client_level`), from the σ Opacus' own search finds for RDP.
    """
    if start is None:
        return _bisect(eps, target_epsilon)
    hi, lo = start, 0.85 * start  # PRV's σ is 7–12% below RDP's in our regime
    eps_hi, eps_lo = eps(hi), eps(lo)
    while eps_hi > target_epsilon:
        lo, eps_lo, hi = hi, eps_hi, 2 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"privacy.target_epsilon={target_epsilon} cannot be met with any noise multiplier. "
                "Raise privacy.target_epsilon."
            )
        eps_hi = eps(hi)
    while eps_lo <= target_epsilon:
        if eps_lo == 0 or lo < 1e-3:
            return _bisect(eps, target_epsilon)  # out of regula falsi's reach (ε = 0 or σ ~ 0): plain bisection
        hi, eps_hi, lo = lo, eps_lo, 0.7 * lo
        eps_lo = eps(lo)
    f_lo, f_hi, side = math.log(eps_lo / target_epsilon), math.log(eps_hi / target_epsilon), 0
    for _ in range(100):
        if target_epsilon - eps_hi <= EPSILON_TOLERANCE:
            break
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo) if f_hi != f_lo else (lo + hi) / 2
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        eps_mid = eps(mid)
        f_mid = math.log(eps_mid / target_epsilon) if eps_mid > 0 else -math.inf
        if f_mid == -math.inf:
            return _bisect(eps, target_epsilon)
        if eps_mid <= target_epsilon:
            hi, eps_hi, f_hi = mid, eps_mid, f_mid
            f_lo = f_lo / 2 if side == -1 else f_lo  # Illinois: halve the end that stayed twice
            side = -1
        else:
            lo, f_lo = mid, f_mid
            f_hi = f_hi / 2 if side == 1 else f_hi
            side = 1
    return hi


def _bisect(eps: Callable[[float], float], target_epsilon: float) -> float:
    """The smallest σ (to `EPSILON_TOLERANCE` in ε) with eps(σ) ≤ target; ε falls as σ grows."""

    lo, hi = 0.0, 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"privacy.target_epsilon={target_epsilon} cannot be met with any noise multiplier. "
                "Raise privacy.target_epsilon."
            )
        eps_hi = eps(hi)
    for _ in range(100):  # halves [lo, hi] each time; ε is continuous in σ, so this ends long before
        if target_epsilon - eps_hi <= EPSILON_TOLERANCE:
            break
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
