"""The privacy group's schema: sample-level DP-SGD (`privacy=dp`) or client-level DP (`privacy=client`).

Its checks live with the mechanisms, in `privacy.config` (called by `fl.app.config.compose`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# privacy.engine.CLIPPINGS (a test keeps them equal): named here so that composing a config does not import Opacus
CLIPPINGS = ("flat", "per_layer")

# privacy.accountant.ACCOUNTANTS (a test keeps them equal), for the same reason
ACCOUNTANT_KINDS = ("prv", "rdp")

CLIENT_CLIPPINGS = ("server", "client")
"""Where a client's update is clipped under client-level DP: by the server wrapper, or by the node's mod."""


@dataclass
class ClientDPConfig:
    """Client-level DP (`privacy=client`): each round's aggregate of clipped client updates gets Gaussian noise.

    McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
    (https://arxiv.org/abs/1710.06963), through Flower's Message-API wrappers (`strategies.client_dp`).
    """

    enabled: bool = False
    clipping: str = "server"  # server | client: who clips each client's update (flwr's fixedclipping_mod)
    clip_norm: float = 0.1  # C: L2 bound on one client's whole update (every tensor it sends) per round
    noise_multiplier: float | None = None  # σ (noise std on the sum of clipped updates = σC); or:
    target_epsilon: float | None = None  # the ε after `privacy.planned_rounds` (default sim.rounds) σ is planned for
    delta: float | None = None  # default 1 / (10 · sim.num_clients)


@dataclass
class PrivacyConfig:
    """Client-side DP-SGD with Opacus; `enabled: false` is `privacy=off` (or `privacy=client`, see `client`)."""

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float | None = None  # default: below 1 / n_k for each client
    max_grad_norm: float = 1.0
    accountant: str = "prv"  # prv (Opacus PRV: upper bound, eps_error 0.01) | rdp; plans σ in both DP modes
    poisson_sampling: bool = True
    planned_rounds: int | None = None  # rounds the budget is planned for; default sim.rounds
    batch_size: int | None = None  # logical (expected Poisson) batch q and σ are planned for; default train.batch_size
    physical_batch: int | None = None  # examples per forward/backward pass under DP; default train.batch_size
    grad_sample_mode: str = "hooks"  # hooks | ghost (Opacus fast gradient clipping) | functorch
    clipping: str = "flat"  # flat: one norm over all trainable tensors | per_layer: each tensor to C/sqrt(#tensors)
    head_clip_share: float | None = None  # per_layer: fraction of C^2 for the task head's tensors; null: equal
    local_steps: int | None = None  # logical steps per round under DP; default train.local_steps
    local_epochs: float | None = None  # or epochs of the partition under DP (overrides privacy.local_steps)
    init_share: float | None = 0.1  # of ε, for Fed-SB's init releases (their own σ); null: one σ for both
    # simulated node policies, written like a node config: "partition-id=0 privacy-epsilon=3 privacy-delta=1e-5"
    node_policies: list[str] = field(default_factory=list)
    client: ClientDPConfig = field(default_factory=ClientDPConfig)  # client-level DP (`privacy=client`)
