"""The run's privacy settings, read once from the composed config: the one bridge from Hydra to `privacy`.

`PrivacySettings.from_config(cfg, init_releases=...)` resolves every default the privacy group leaves open
(planned rounds, the logical and physical batch, the local work under DP, the simulated node policies), so
code outside `privacy/` never reads ``cfg.privacy``. The releases a client makes before round 1 (Fed-SB's init)
are the method's to say (`LoraStrategy.client_init_releases`); the app passes the number in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from omegaconf import DictConfig, ListConfig

from privacy.budget import default_delta
from privacy.policy import NodePolicy, parse_node_policies


@dataclass(frozen=True)
class ClientLevelSettings:
    """Client-level DP (`privacy=client`, `privacy.client.*`): who clips, C, and σ or the ε it is planned for."""

    enabled: bool = False
    clipping: str = "server"  # "server" | "client": the server's wrapper or the node's mod clips each update
    clip_norm: float = 0.1  # C: L2 bound on one client's whole update per round
    noise_multiplier: float | None = None  # σ on the sum of clipped updates, or None: planned from target_epsilon
    target_epsilon: float | None = None  # ε after the planned rounds (None when σ is given)
    delta: float | None = None  # None: 1 / (10 · sim.num_clients)
    accountant: str = "prv"  # `privacy.accountant`: "prv" | "rdp"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ClientLevelSettings:
        """From ``cfg.privacy.client`` (and ``cfg.privacy.accountant``)."""
        c = cfg.privacy.client
        return cls(
            accountant=str(cfg.privacy.accountant),
            enabled=bool(c.enabled),
            clipping=str(c.clipping),
            clip_norm=float(c.clip_norm),
            noise_multiplier=None if c.noise_multiplier is None else float(c.noise_multiplier),
            target_epsilon=None if c.target_epsilon is None else float(c.target_epsilon),
            delta=None if c.delta is None else float(c.delta),
        )


@dataclass(frozen=True)
class PrivacySettings:
    """Sample-level DP-SGD (`privacy=dp`) and client-level DP settings of one run, defaults resolved.

    Hashable (the node policies aside), so a client's plan can be cached on it (`privacy.plan.client_plan`).

    Attributes
    ----------
    enabled : bool
        Sample-level DP-SGD on every client.
    target_epsilon : float
        ε each client's whole run is planned for.
    delta : float or None
        δ; None: `privacy.budget.default_delta` of each client's own n (see `delta_for`).
    max_grad_norm : float
        C, the per-example clipping bound.
    accountant : str
        ``"prv"`` (the default) or ``"rdp"``: plans σ and accounts every release, sample- and client-level.
    poisson_sampling : bool
        Poisson batches, as the accounting assumes.
    planned_rounds : int
        Rounds the budget is planned for (`privacy.planned_rounds`, default `sim.rounds`).
    logical_batch : int
        Examples per optimiser step: `privacy.batch_size` under DP when set, else `train.batch_size`.
    physical_batch : int
        Examples per forward/backward pass: `privacy.physical_batch` under DP when set, else `train.batch_size`;
        never more than the logical batch. Larger is faster (fewer passes) where memory allows; the noise and
        the accounting do not depend on it.
    local_steps, local_epochs : int or None, float or None
        A round's local work (epochs, when set, win over steps): `privacy.local_*` under DP when either is
        set, else `train.local_*`.
    grad_sample_mode : str
        Opacus' mode (`privacy.engine.GRAD_SAMPLE_MODES`).
    clipping : str
        ``"flat"`` or ``"per_layer"``.
    head_clip_share : float or None
        per_layer only: the task head's share of C².
    init_share : float or None
        Fraction of ε for the releases before round 1 (their own σ); None: one σ for both.
    init_releases : int
        Full-batch Gaussian releases a client makes before round 1 (Fed-SB's init), which its plan reserves.
    node_policies : mapping of int to NodePolicy
        Simulated node policies by partition id (`privacy.node_policies`), for nodes without their own.
    client : ClientLevelSettings
        Client-level DP.
    """

    enabled: bool
    target_epsilon: float
    delta: float | None
    max_grad_norm: float
    accountant: str
    poisson_sampling: bool
    planned_rounds: int
    logical_batch: int
    physical_batch: int
    local_steps: int | None
    local_epochs: float | None
    grad_sample_mode: str = "hooks"
    clipping: str = "flat"
    head_clip_share: float | None = None
    init_share: float | None = None
    init_releases: int = 0
    node_policies: Mapping[int, NodePolicy] = field(default_factory=dict, hash=False)
    client: ClientLevelSettings = field(default_factory=ClientLevelSettings)

    def __post_init__(self) -> None:
        if self.init_releases < 0:
            raise ValueError(f"init_releases must be >= 0, got {self.init_releases}.")

    @classmethod
    def from_config(cls, cfg: DictConfig, *, init_releases: int) -> PrivacySettings:
        """Read `cfg.privacy` (with `cfg.train` and `cfg.sim` for the defaults) of a composed, validated config.

        Parameters
        ----------
        cfg : DictConfig
            The run config (`fl.app.config.compose`).
        init_releases : int
            Releases before round 1 that each client's plan reserves: the method's
            ``client_init_releases(cfg)`` (0 for methods without such an init).
        """
        p, t = cfg.privacy, cfg.train
        logical = int(p.batch_size) if p.enabled and p.batch_size else int(t.batch_size)
        if p.enabled and (p.local_epochs is not None or p.local_steps is not None):
            epochs, steps = p.local_epochs, p.local_steps
        else:
            epochs, steps = t.local_epochs, t.local_steps
        return cls(
            enabled=bool(p.enabled),
            target_epsilon=float(p.target_epsilon),
            delta=None if p.delta is None else float(p.delta),
            max_grad_norm=float(p.max_grad_norm),
            accountant=str(p.accountant),
            poisson_sampling=bool(p.poisson_sampling),
            planned_rounds=int(p.planned_rounds or cfg.sim.rounds),
            logical_batch=logical,
            physical_batch=min(int(p.physical_batch or t.batch_size) if p.enabled else int(t.batch_size), logical),
            local_steps=None if steps is None else int(steps),
            local_epochs=None if epochs is None else float(epochs),
            grad_sample_mode=str(p.grad_sample_mode),
            clipping=str(p.clipping),
            head_clip_share=None if p.head_clip_share is None else float(p.head_clip_share),
            init_share=None if p.init_share is None else float(p.init_share),
            init_releases=int(init_releases),
            node_policies=parse_node_policies(list(p.node_policies or [])),
            client=ClientLevelSettings.from_config(cfg),
        )

    def delta_for(self, num_examples: int) -> float:
        """δ of a client with `num_examples` examples: `delta`, or `default_delta` of its n."""
        return self.delta if self.delta is not None else default_delta(num_examples)


def planned_epsilon(cfg: DictConfig | ListConfig) -> float | None:
    """The sample-level ε a (possibly older, saved) run config asked for; None when DP-SGD was off."""
    p = cfg.get("privacy") if isinstance(cfg, DictConfig) else None
    if p is None or not p.get("enabled", False):
        return None
    return float(p.target_epsilon)
