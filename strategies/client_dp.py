"""Client-level DP around this framework's strategies: Flower's fixed-clipping DP wrappers, made to fit.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
https://arxiv.org/abs/1710.06963 (DP-FedAvg); Flower's `DifferentialPrivacyServerSideFixedClipping` and
`DifferentialPrivacyClientSideFixedClipping` (`flwr.serverapp.strategy`) wrap a strategy: each round every
sampled client's update u_k = reply_k − global (every tensor it sends, the head included, as ONE vector) is
clipped to ‖u_k‖₂ ≤ C, the wrapped strategy aggregates, and N(0, (σC/m)²) is added to every coordinate of the
aggregate of m updates. Server-side clipping: the wrapper clips each reply. Client-side: the node clips with
Flower's `fixedclipping_mod` (`privacy.client_level.client_clipping_mod`) and this wrapper rejects a reply
whose update exceeds C.

What the wrapped methods release and what is clipped (u_k is what the client trains and sends):

- FedIT: A, B of every module and the head, clipped together as one vector (not A and B separately).
- FFA-LoRA: B and the head (A is frozen, from the seed, never sent).
- Fed-SB: R and the head; A and B are frozen and broadcast, not updates. Only `strategy.init=random|server`:
  a federated or sketched init releases client gradients before round 1 (refused in `fl.config_privacy`).
- LoRA-FAIR and FedEx-LoRA do not compose (`client_dp_problem`): their server step reads each client's
  B_k·A_k, which client-level DP leaves un-noised, and releases a function of it that the noise on the
  mean does not cover. Construction refuses them.

Where this departs from Flower's `aggregate_train` (it overrides that one hook and reuses the rest):
- replies pass through the wrapped strategy's own checks first (errors, declines, names, shapes, NaN),
  counted in its round stats; Flower's version skips the round on any error reply and clips by position.
- every reply weighs 1 (the strategy's `aggregate_screened(..., release=True)`, which also counts the release in
  its checkpointed state): σC/m is the noise for a plain mean of m clipped updates; an n_k-weighted mean would
  let one client move it by more than C/m.
- the noise is for the m updates actually averaged (σC/m, m = this round's `aggregated`), not the m planned:
  with fewer replies a fixed σC/m_planned would be too little noise.
- the noise comes from a `torch.Generator` seeded by the run seed and the round (`privacy.client_level.
  add_gaussian_noise`), not numpy's global RNG, so `privacy=client` runs are reproducible; a reply is clipped
  on its decoded copy, never in the caller's message.
- each released aggregate is one step of the run's accountant (`epsilon_of(releases)`), logged per round.
- a server optimizer (`server_opt=`) steps from the noised aggregate, after the release: post-processing.

Like Flower's wrappers it only calls the wrapped strategy's hooks (`begin`, `configure_train`, `screen`,
`aggregate_screened`, `server_step`) and writes its fields into the round's record; it sets nothing on the
strategy. A defence declares whether it stands beside the clip (`Defence.dp_clip_problem`; the norm bound built
under `privacy=client` is the clip, and records it through `RobustAggregation.dp_clipped`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from fl import constants as K
from fl.checks import derive_seed
from fl.wire import from_record, to_record
from privacy.client_level import add_gaussian_noise
from strategies.base import LoraStrategy
from strategies.screening import Reply
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-4  # relative slack when checking a node-clipped update against C (float32 rounding)
NOISE_SALT = 7_919  # the noise generator's stream: fl.checks.derive_seed(seed, stream=salt, index=round)


def update_norm(reply: list[np.ndarray], current: list[np.ndarray]) -> float:
    """L2 norm of one client's whole update (reply − global, every tensor as one vector)."""
    return float(get_norm([r - c for r, c in zip(reply, current, strict=True)]))


class ClientLevelDP(DifferentialPrivacyFixedClippingBase):
    """Client-level DP around a `LoraStrategy`; a subclass says who clips (`bound`). Mixed in before Flower's
    wrapper class of that side, whose `configure_train` and evaluation hooks it reuses.

    Parameters
    ----------
    strategy : LoraStrategy
        The method to wrap (one whose `client_dp_problem` is None, built from the run's config).
    noise_multiplier : float
        σ: the noise std on the sum of clipped updates is σ·C.
    clip_norm : float
        C, the L2 bound on one client's whole update per round.
    num_sampled_clients : int
        m planned per round (Flower's field; the noise uses the m actually aggregated).
    epsilon_of : callable
        ε of the model after k released aggregates (`privacy.client_level.ClientLevelPlan.epsilon`).
    """

    def __init__(
        self,
        strategy: LoraStrategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        num_sampled_clients: int,
        epsilon_of: Callable[[int], float],
    ) -> None:
        if type(strategy).client_dp_problem is not None:
            raise ValueError(
                f"{type(strategy).__name__} does not compose with client-level DP (privacy=client): "
                f"{type(strategy).client_dp_problem}."
            )
        problem = strategy.robust.dp_clip_problem(clip_norm)
        if problem is not None:
            raise ValueError(f"{type(strategy).__name__} cannot be wrapped for client-level DP: {problem}.")
        super().__init__(strategy, noise_multiplier, clip_norm, num_sampled_clients)
        self.epsilon_of = epsilon_of
        self.reference = ArrayRecord()  # the global arrays this round's updates are measured from

    @property
    def inner(self) -> LoraStrategy:
        """The wrapped strategy."""
        return cast(LoraStrategy, self.strategy)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """The wrapped strategy's `begin` (e.g. Fed-SB's init), then Flower's round loop on this wrapper."""
        return super().start(
            grid,
            self.inner.begin(grid, initial_arrays),
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays, then Flower's wrapper (which may add the clipping norm to `config`)."""
        self.reference = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def bound(self, reply: Reply) -> tuple[Reply, float] | str:
        """Make or check ‖update‖ ≤ C for one sound reply: (the reply to aggregate, the factor its update was
        shrunk by), or why it must be rejected."""
        raise NotImplementedError

    def update_of(self, reply: Reply) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """(names, reply arrays, global arrays) in the global record's order, matched by name (copies)."""
        names = list(self.reference.keys())
        return names, [reply.state[n].numpy().copy() for n in names], [self.reference[n].numpy() for n in names]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Checks, clipping, the method's rule on equal weights, then noise for the updates averaged."""
        inner = self.inner
        rnd = server_round + inner.round_offset
        stats = inner.stats.setdefault(rnd, RoundStats())  # the round's record (a metrics.jsonl row)
        kept, clipped = [], 0
        for reply in inner.screen(rnd, replies):
            bounded = self.bound(reply)
            if isinstance(bounded, str):
                stats.rejected += 1
                log.warning("round %d: rejected the reply of node %d: %s", rnd, reply.node, bounded)
                continue
            reply, scale = bounded
            if scale < 1.0:
                clipped += 1
                inner.robust.dp_clipped(stats, reply.partition, scale)
            kept.append(reply)
        if kept and clipped:
            stats.extra[K.CLIENT_DP_CLIPPED] = clipped / len(kept)
        arrays, metrics = inner.aggregate_screened(rnd, kept, release=True)
        if arrays is not None:
            std = compute_stdv(self.noise_multiplier, self.clipping_norm, stats.aggregated)
            gen = torch.Generator().manual_seed(derive_seed(inner.seed, stream=NOISE_SALT, index=rnd, modulus=2**63))
            arrays = to_record(add_gaussian_noise(from_record(arrays), std=std, generator=gen))
            stats.extra[K.CLIENT_DP_NOISE_STD] = std
            arrays = inner.server_step(rnd, arrays)  # server_opt= on the released aggregate: post-processing
        epsilon = self.epsilon_of(inner.releases)
        stats.extra[K.CLIENT_DP_RELEASES] = inner.releases
        stats.extra[K.CLIENT_DP_EPSILON] = epsilon
        log.info("round %d: client-level DP ε=%.4g after %d releases", rnd, epsilon, inner.releases)
        return arrays, metrics


class ClientDPServerSideClipping(ClientLevelDP, DifferentialPrivacyServerSideFixedClipping):
    """Client-level DP, the server clips every update (`privacy.client.clipping=server`)."""

    def bound(self, reply: Reply) -> tuple[Reply, float] | str:
        """Clip the reply's decoded update to C (Flower's `compute_clip_model_update`, on a copy)."""
        names, arrays, current = self.update_of(reply)
        norm = update_norm(arrays, current)
        compute_clip_model_update(param1=arrays, param2=current, clipping_norm=self.clipping_norm)
        state = {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, arrays, strict=True)}
        return replace(reply, state=state), (self.clipping_norm / norm if norm > self.clipping_norm else 1.0)


class ClientDPClientSideClipping(ClientLevelDP, DifferentialPrivacyClientSideFixedClipping):
    """Client-level DP, each node clips its own update (`privacy.client.clipping=client`): Flower's wrapper puts
    ``clipping_norm`` into every training message's config; the node's `client_clipping_mod` (Flower's
    `fixedclipping_mod`) clips."""

    def bound(self, reply: Reply) -> tuple[Reply, float] | str:
        """Reject an update the node did not clip: its norm past C would break the noise's calibration."""
        _, arrays, current = self.update_of(reply)
        norm = update_norm(arrays, current)
        if norm > self.clipping_norm * (1 + NORM_TOLERANCE):
            return (
                f"update norm {norm:.4g} exceeds privacy.client.clip_norm={self.clipping_norm:g}: the node did not "
                "clip (its ClientApp must run privacy.client_level.client_clipping_mod)"
            )
        return reply, 1.0


WRAPPERS: dict[str, type[ClientLevelDP]] = {
    "server": ClientDPServerSideClipping,
    "client": ClientDPClientSideClipping,
}
"""`privacy.client.clipping` -> wrapper class."""


def client_dp_wrapper(
    strategy: LoraStrategy,
    *,
    clipping: str,
    noise_multiplier: float,
    clip_norm: float,
    num_sampled_clients: int,
    epsilon_of: Callable[[int], float],
) -> ClientLevelDP:
    """`strategy` wrapped for client-level DP with `clipping` = ``server`` or ``client``."""
    if clipping not in WRAPPERS:
        raise ValueError(f"privacy.client.clipping={clipping!r} is unknown; use one of {sorted(WRAPPERS)}.")
    return WRAPPERS[clipping](
        strategy,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        num_sampled_clients=num_sampled_clients,
        epsilon_of=epsilon_of,
    )
