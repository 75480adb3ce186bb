"""Rényi-DP accounting that is tight and quiet: the RDP orders widen when the optimum sits at their edge.

Converting RDP to (ε, δ) takes the minimum over a finite list of orders α (Mironov 2017; the conversion is
Balle et al. 2020, Thm. 21, as in Opacus). When the minimum falls on the first or last order, the true optimum
lies outside the list and the ε reported is looser than it needs to be; Opacus then warns ("Optimal order is
the largest alpha"). Here the list widens instead (`rdp_epsilon`), so the ε is the tight one and no warning is
left to print. Candidates a σ search tries (`privacy.budget.plan_dp`) are evaluated inside `quiet_orders`,
which silences exactly that warning and nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

DEFAULT_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""Opacus' default orders: 1.1 … 10.9 by 0.1, then 12 … 63."""

MAX_ORDER = 2.0**16
"""No order above this: at that point the optimum is so large that ε is tiny (σ in the hundreds)."""

MIN_ORDER = 1.0 + 1e-4
"""No order below this: an optimum so close to 1 means ε in the tens or more (hardly any noise)."""

ORDER_WARNING = "Optimal order is the"
"""The start of the warning `opacus.accountants.analysis.rdp.get_privacy_spent` gives at an edge order."""

PRV_EPS_ERROR = 0.01
"""The PRV accountant's ε error (Opacus' default `eps_error`): its ε is an upper bound, within this of the true ε
of the composed mechanism (Gopi et al. 2021, Thm. 5.5). Stated in every plan (`DPPlan.eps_error`)."""

History = Sequence[tuple[float, float, int]]
"""(σ, q, steps) entries of a Poisson-subsampled Gaussian mechanism, as Opacus' accountants keep them."""


@contextmanager
def quiet_orders() -> Iterator[None]:
    """Silence Opacus' edge-order warning (only that one) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ORDER_WARNING, category=UserWarning)
        yield


def rdp_curve(history: History, orders: Sequence[float]) -> np.ndarray:
    """RDP ε(α) of the composed history at each order (adds over entries: RDP composes by addition)."""
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total = total + np.atleast_1d(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=int(steps), orders=list(orders))
        )
    return total


def epsilon_from_curve(rdp: Sequence[float] | np.ndarray, orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, optimal order) of an RDP curve at δ (Opacus' conversion, without its edge warning)."""
    with quiet_orders():
        eps, order = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps), float(order)


def widened(orders: Sequence[float], edge: str) -> tuple[float, ...]:
    """`orders` extended past its `edge` ("high": up to 4× the largest; "low": ten times closer to 1)."""
    if edge == "high":
        top = max(orders)
        extra = sorted({float(int(top * 2 ** (k / 4))) for k in range(1, 9)} - set(orders))
        return tuple(orders) + tuple(a for a in extra if a <= MAX_ORDER)
    low = min(orders) - 1.0
    extra = [1.0 + low * k / 10 for k in range(1, 10)]
    return tuple(a for a in extra if a >= MIN_ORDER) + tuple(orders)


def rdp_epsilon(
    history: History, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> tuple[float, float, tuple[float, ...]]:
    """The tight RDP ε of `history` at δ: (ε, optimal order, the orders used).

    Starts from `orders` and widens them (`widened`) while the optimum sits at the first or last one, up to
    [`MIN_ORDER`, `MAX_ORDER`]. With the optimum inside `orders` the result is Opacus' own
    (``RDPAccountant.get_privacy_spent`` with the same orders), to the last bit.
    """
    used = tuple(float(a) for a in orders)
    while True:
        eps, order = epsilon_from_curve(rdp_curve(history, used), used, delta)
        if not np.isfinite(eps):
            return eps, order, used
        if order == max(used) and max(used) < MAX_ORDER:
            more = widened(used, "high")
        elif order == min(used) and min(used) > MIN_ORDER:
            more = widened(used, "low")
        else:
            return eps, order, used
        if len(more) == len(used):
            return eps, order, used
        used = more


def prv_epsilon(history: History, delta: float, *, eps_error: float = PRV_EPS_ERROR) -> float:
    """ε of `history` at δ by Opacus' PRV accountant (Gopi et al. 2021): the numerical composition of the
    privacy loss distributions, usually tighter than RDP's conversion. The upper bound: the true ε lies within
    `eps_error` below it."""
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return prv_accountant_epsilon(acc, delta, eps_error=eps_error)


def prv_accountant_epsilon(acc: IAccountant, delta: float, *, eps_error: float = PRV_EPS_ERROR) -> float:
    """`acc.get_epsilon(delta, eps_error=eps_error)` (PRV's upper bound), quietly. PRV at q = 1 takes
    log(1 - q) = log 0 on purpose (the result is exact), and Opacus sizes PRV's domain from an RDP bound at its
    default orders (prv/domain.py), whose optimum can sit at their edge: that bound only sizes the domain, it is not
    the ε returned, so its edge-order warning is noise (seen once per actor with privacy.accountant=prv)."""
    with np.errstate(divide="ignore"), quiet_orders():
        return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
