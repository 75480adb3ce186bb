"""Server optimizers: each round's aggregate read as a pseudo-gradient and stepped with momentum or an adaptive rule.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (FedAdam, FedYogi, FedAdagrad); Hsu, Qi, Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335
(FedAvgM).

With x the current global tensors and a the method's aggregate of this round (after its own rule: LoRA-FAIR's
correction, HetLoRA's padded average, client-level DP's noise), Δ = a − x, per tensor and coordinate:

- ``avgm``:    m ← Δ (first round), else μ·m + Δ;          x ← x + η·m
- ``adam``:    m ← β1·m + (1−β1)·Δ,  v ← β2·v + (1−β2)·Δ²;  x ← x + η_t·m / (√v + τ),
  η_t = η·√(1 − β2^(t+1)) / (1 − β1^(t+1)) with t the round (Flower's FedAdam bias correction)
- ``yogi``:    m as adam,  v ← v − (1−β2)·Δ²·sign(v − Δ²);   x ← x + η·m / (√v + τ)
- ``adagrad``: m as adam (β1 = 0: m = Δ),  v ← v + Δ²;      x ← x + η·m / (√v + τ)

Moments start at zero, as in Flower's strategies (Reddi et al. start v at τ²). `none` leaves x ← a.

Why not Flower's own FedAvgM/FedAdam/FedYogi/FedAdagrad objects: they compute this step inside
`aggregate_train`, on a FedAvg of the replies they average themselves, and keep the "current" arrays their own
`configure_train` stored. Our methods' aggregates are not a FedAvg of the replies (and some methods step a state
that is not the message's arrays, FlexLoRA's ΔW), so the same formulas are applied here to whatever the method
aggregates; tests/test_server_opt.py checks every rule against the Flower strategy, step for step.
The moments are server state (`state_dict`, checkpointed); a round counts from the run's start, so a resumed run
takes the same steps. Under DP the step acts on released (noised) tensors only: post-processing, no ε.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fl.checks import require

STATE_TYPE = "fedlora-server-opt"


class ServerOptimizer:
    """`server_opt=none`: the global tensors become the aggregate. Subclasses step a pseudo-gradient.

    Parameters
    ----------
    lr : float
        η, the server learning rate (> 0).
    momentum : float
        μ for ``avgm``, in [0, 1).
    beta_1, beta_2 : float
        Moment decays for ``adam``/``yogi``/``adagrad``, in [0, 1).
    tau : float
        τ, the floor added to √v (> 0).
    """

    name: ClassVar[str] = "none"

    def __init__(
        self, *, lr: float = 1.0, momentum: float = 0.9, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        require(math.isfinite(lr) and lr > 0, "server_opt.lr", lr, "use a server learning rate > 0.")
        require(0 <= momentum < 1, "server_opt.momentum", momentum, "use a momentum in [0, 1).")
        require(0 <= beta_1 < 1, "server_opt.beta_1", beta_1, "use a decay in [0, 1).")
        require(0 <= beta_2 < 1, "server_opt.beta_2", beta_2, "use a decay in [0, 1).")
        require(math.isfinite(tau) and tau > 0, "server_opt.tau", tau, "use an adaptivity floor τ > 0 (e.g. 1e-3).")
        self.lr, self.momentum, self.beta_1, self.beta_2, self.tau = lr, momentum, beta_1, beta_2, tau
        self.m: dict[str, torch.Tensor] = {}  # first moment (avgm: the momentum buffer), float64
        self.v: dict[str, torch.Tensor] = {}  # second moment, float64

    @property
    def active(self) -> bool:
        """Whether this optimizer changes anything (`none` does not)."""
        return type(self) is not ServerOptimizer

    def describe(self) -> str:
        """One line for the strategy's summary."""
        return f"server_opt={self.name} (lr={self.lr:g})"

    def step(
        self, server_round: int, current: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new global value of every tensor of `aggregate` (`current` must hold the same names and shapes).

        `server_round` is the run's round (1 for the first), counted across resumes."""
        out = {}
        for key, agg in aggregate.items():
            if key not in current or current[key].shape != agg.shape:
                got = None if key not in current else tuple(current[key].shape)
                raise ValueError(
                    f"server_opt={self.name}: the aggregate's {key!r} {tuple(agg.shape)} has no current global "
                    f"tensor of that shape (found {got}); the method changed its arrays' shapes between rounds."
                )
            x = current[key].double()
            out[key] = (x + self.update(server_round, key, agg.double() - x)).to(agg.dtype)
        return out

    def update(self, server_round: int, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The change to the global tensor `key` for pseudo-gradient `delta` (float64). `none`: delta itself."""
        return delta

    def first_moment(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """m ← β1·m + (1−β1)·Δ (zeros before the first round)."""
        m = self.m.get(key, torch.zeros_like(delta))
        self.m[key] = self.beta_1 * m + (1 - self.beta_1) * delta
        return self.m[key]

    def state_dict(self) -> dict[str, Any]:
        """The moments, tagged with this optimizer's name (a checkpoint of another is refused)."""
        return {"type": STATE_TYPE, "name": self.name, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; an empty state (an older checkpoint) starts the moments at zero."""
        if not state:
            return
        if state.get("type") != STATE_TYPE or state.get("name") != self.name:
            raise ValueError(
                f"The checkpoint's server optimizer is {state.get('name')!r} but server_opt={self.name}; "
                "resume with the run's own server_opt."
            )
        self.m, self.v = dict(state["m"]), dict(state["v"])


class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019; Flower's `FedAvgM` with `server_momentum`)."""

    name: ClassVar[str] = "avgm"

    def update(self, server_round: int, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.m.get(key)
        self.m[key] = delta if m is None else self.momentum * m + delta
        return self.lr * self.m[key]

    def describe(self) -> str:
        return f"server_opt=avgm (lr={self.lr:g}, momentum={self.momentum:g})"


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al., ICLR 2021; Flower's `FedAdam`, its bias correction included)."""

    name: ClassVar[str] = "adam"

    def update(self, server_round: int, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.first_moment(key, delta)
        v = self.beta_2 * self.v.get(key, torch.zeros_like(delta)) + (1 - self.beta_2) * delta**2
        self.v[key] = v
        t = server_round + 1.0  # Flower's exponent: its server_round + 1
        eta = self.lr * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
        return eta * m / (v.sqrt() + self.tau)

    def describe(self) -> str:
        return f"server_opt=adam (lr={self.lr:g}, betas=({self.beta_1:g}, {self.beta_2:g}), tau={self.tau:g})"


class FedYogi(FedAdam):
    """FedYogi (Reddi et al., ICLR 2021; Flower's `FedYogi`)."""

    name: ClassVar[str] = "yogi"

    def update(self, server_round: int, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.first_moment(key, delta)
        v = self.v.get(key, torch.zeros_like(delta))
        self.v[key] = v - (1 - self.beta_2) * delta**2 * torch.sign(v - delta**2)
        return self.lr * m / (self.v[key].sqrt() + self.tau)


class FedAdagrad(FedAdam):
    """FedAdagrad (Reddi et al., ICLR 2021; Flower's `FedAdagrad`)."""

    name: ClassVar[str] = "adagrad"

    def update(self, server_round: int, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.first_moment(key, delta)
        self.v[key] = self.v.get(key, torch.zeros_like(delta)) + delta**2
        return self.lr * m / (self.v[key].sqrt() + self.tau)

    def describe(self) -> str:
        return f"server_opt=adagrad (lr={self.lr:g}, beta_1={self.beta_1:g}, tau={self.tau:g})"


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (ServerOptimizer, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
"""`server_opt.name` -> optimizer class."""


def make_server_optimizer(cfg: Any) -> ServerOptimizer:
    """The optimizer of a composed config's `server_opt` group, its values checked (errors name the key)."""
    s = cfg.server_opt
    require(s.name in SERVER_OPTIMIZERS, "server_opt.name", s.name, f"use one of {', '.join(SERVER_OPTIMIZERS)}.")
    return SERVER_OPTIMIZERS[str(s.name)](
        lr=float(s.lr),
        momentum=float(s.momentum),
        beta_1=float(s.beta_1),
        beta_2=float(s.beta_2),
        tau=float(s.tau),
    )
