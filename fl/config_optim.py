"""The federated optimisation groups' schemas: the server optimizer (`server_opt=`) and client drift control
(`drift=`). Their registries and checks live with the maths: `strategies.server_opt` (server side) and
`clients.drift` (client side); `fl.app.config.compose` calls both, so a bad value fails before any client trains.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerOptConfig:
    """A server optimizer on the pseudo-gradient Δ = aggregate − current global (Reddi et al., ICLR 2021,
    https://arxiv.org/abs/2003.00295; Hsu et al. 2019, https://arxiv.org/abs/1909.06335 for FedAvgM).

    `name=none` is plain FedAvg of the method's aggregate (the global arrays become the aggregate)."""

    name: str = "none"  # none | avgm | adam | yogi | adagrad
    lr: float = 1.0  # η, the server learning rate (avgm: 1.0 with momentum 0 is FedAvg)
    momentum: float = 0.9  # avgm: heavy-ball momentum on Δ
    beta_1: float = 0.9  # adam, yogi, adagrad: first-moment decay (adagrad: 0 = Reddi et al.'s FedAdagrad)
    beta_2: float = 0.99  # adam, yogi: second-moment decay
    tau: float = 1e-3  # adam, yogi, adagrad: τ, the adaptivity floor added to √v
    # Server-side model averaging (SWA; strategies/averaging.py): from this round on, the model the server scores
    # and exports is the mean of the rounds' global models (the clients still train from the global); 0: off
    average_from: int = 0
    average_window: int = 0  # 0: the uniform mean of every round from average_from; k: then an EMA of weight 1/k


@dataclass
class DriftConfig:
    """Client drift control: FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127) or SCAFFOLD
    (Karimireddy et al., ICML 2020, https://arxiv.org/abs/1910.06378) on the tensors a client trains."""

    name: str = "none"  # none | fedprox | scaffold
    mu: float = 0.01  # fedprox: μ of the proximal term (μ/2)·‖w − w_global‖²
