"""Client-level DP (`privacy=client`): the plan (σ, q = m/N, rounds), its accountant, and the node's clipping mod.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018,
https://arxiv.org/abs/1710.06963. Each round the server releases the mean of the m sampled clients' updates,
each clipped to L2 norm C, plus N(0, (σC/m)²) per coordinate: a Gaussian mechanism with noise multiplier σ on
the sum. Over rounds with client sampling it is accounted as the Poisson-subsampled Gaussian mechanism at
q = m/N, one step per released aggregate, by the run's `privacy.accountant` (Opacus' PRV accountant by default,
Gopi et al. 2021; or its RDP analysis, Mironov et al. 2019). With every client sampled (q = 1) and few rounds, PRV's
upper bound stays within its ε error (0.01) of the exact ε of the composed Gaussian mechanism (Balle & Wang 2018;
checked in tests/test_privacy_prv.py), where RDP overstates it by 10–20%. Our sampling draws
exactly m of N without replacement; charging it as Poisson at q = m/N is the usual approximation (as in
McMahan et al.), not a proof for fixed-size sampling.

The strategy wrappers that clip and add the noise are Flower's (`strategies.client_dp`); this module holds
what both sides need: the plan, ε after k releases, and `client_clipping_mod` for `privacy.client.clipping=client`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from omegaconf import DictConfig
from opacus.accountants.utils import get_noise_multiplier

from fl import constants as K
from privacy.accountant import DEFAULT_ACCOUNTANT, ClientAccountant
from privacy.budget import EPSILON_TOLERANCE, smallest_noise_multiplier
from privacy.orders import PRV_EPS_ERROR
from privacy.settings import ClientLevelSettings


@dataclass(frozen=True)
class ClientLevelPlan:
    """Client-level DP for one run (from `plan_client_level`)."""

    noise_multiplier: float  # σ: noise std on the sum of clipped updates / C
    clip_norm: float  # C: L2 bound on one client's update per round
    sampled: int  # m: clients sampled per round
    population: int  # N: sim.num_clients
    planned_rounds: int
    delta: float
    target_epsilon: float | None  # None when σ was given directly
    clipping: str  # "server" | "client"
    accountant: str = "prv"  # "prv" | "rdp": plans σ and accounts each release
    eps_error: float | None = PRV_EPS_ERROR  # PRV: its ε is an upper bound within this of the true ε; None: RDP

    @property
    def sample_rate(self) -> float:
        """q = m / N."""
        return self.sampled / self.population

    def epsilon(self, releases: int) -> float:
        """ε of the model after `releases` noisy aggregates (inf without noise)."""
        return client_level_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            releases=releases,
            delta=self.delta,
            accountant=self.accountant,
        )

    def describe(self) -> str:
        """One line for logs."""
        planned = f"planned ε={self.target_epsilon:g}" if self.target_epsilon is not None else "σ given"
        return (
            f"client-level DP ({self.clipping}-side clipping): C={self.clip_norm:g}, σ={self.noise_multiplier:.4g}, "
            f"q={self.sampled}/{self.population}, {self.planned_rounds} rounds ({planned}, δ={self.delta:.2e}): "
            f"ε={self.epsilon(self.planned_rounds):.4g} after all rounds, by {self.accountant}"
        )


def sample_size(num_nodes: int, *, fraction: float, minimum: int) -> int:
    """Clients sampled per round out of `num_nodes`: `LoraStrategy.sample`'s rule."""
    return min(num_nodes, max(minimum, round(fraction * num_nodes)))


def client_level_epsilon(
    *, noise_multiplier: float, sample_rate: float, releases: int, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε after `releases` Poisson-subsampled Gaussian releases (σ, q), by `accountant` ("prv" or "rdp")."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = ClientAccountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=releases)
    return acc.epsilon(delta)


def plan_client_level(cfg: DictConfig) -> ClientLevelPlan:
    """σ given (`privacy.client.noise_multiplier`) or the smallest σ with ε ≤ `privacy.client.target_epsilon`
    after `privacy.planned_rounds` (default sim.rounds) releases at q = m/N, by `privacy.accountant`. RDP: Opacus'
    `get_noise_multiplier`. PRV: the same search as sample-level plans (`privacy.budget.smallest_noise_multiplier`)
    from RDP's σ — Opacus' PRV search bisects [0, 20], ~12 PRV evaluations at 0.5–1.2 s each at q = 0.5 (10 s a
    plan on 2 cores), where 3–5 suffice from RDP's σ."""
    c, sim = ClientLevelSettings.from_config(cfg), cfg.sim
    population = int(sim.num_clients)
    sampled = sample_size(population, fraction=float(sim.fraction_train), minimum=int(sim.min_train_clients))
    rounds = int(cfg.privacy.planned_rounds or sim.rounds)
    delta = c.delta if c.delta is not None else 1.0 / (10.0 * population)
    if c.noise_multiplier is not None:
        sigma = c.noise_multiplier
    elif c.target_epsilon is None:
        raise ValueError("privacy.client: give privacy.client.noise_multiplier or privacy.client.target_epsilon.")
    else:
        q = sampled / population
        sigma = float(  # Opacus' own search; for PRV the bracket its refinement starts from
            get_noise_multiplier(
                target_epsilon=c.target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=rounds,
                accountant="rdp",
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )
        if c.accountant != "rdp":
            sigma = smallest_noise_multiplier(
                lambda s: client_level_epsilon(
                    noise_multiplier=s, sample_rate=q, releases=rounds, delta=delta, accountant=c.accountant
                ),
                c.target_epsilon,
                start=sigma,
            )
    return ClientLevelPlan(
        noise_multiplier=sigma,
        clip_norm=c.clip_norm,
        sampled=sampled,
        population=population,
        planned_rounds=rounds,
        delta=delta,
        target_epsilon=c.target_epsilon,
        clipping=c.clipping,
        accountant=c.accountant,
        eps_error=PRV_EPS_ERROR if c.accountant == "prv" else None,
    )


def client_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` for training messages that ask for it (`clipping_norm` in the config).

    A no-op for every other run (``privacy=off``/``dp``, or server-side clipping). Fed-SB's first message also
    carries the frozen A and B in a second ArrayRecord, which Flower's mod refuses; it is set aside while the
    mod looks at the message and put back before the ClientApp runs. A reply without arrays (a node declining
    by its policy) goes back as it is: nothing to clip, and its reason stays readable.
    """
    conf = msg.content.config_records.get(K.CONFIG)
    if conf is None or KEY_CLIPPING_NORM not in conf:
        return call_next(msg, context)
    aside = {k: v for k, v in msg.content.array_records.items() if k != K.ARRAYS}
    for key in aside:
        del msg.content[key]
    replies: list[Message] = []

    def run(m: Message, ctxt: Context) -> Message:
        for key, record in aside.items():
            m.content[key] = record
        reply = call_next(m, ctxt)
        replies.append(reply)
        return reply

    out = fixedclipping_mod(msg, context, run)
    if replies and not replies[0].has_error() and not replies[0].content.array_records:
        return replies[0]
    return out


def add_gaussian_noise(
    state: Mapping[str, torch.Tensor], *, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A copy of `state` with N(0, std²) added to every coordinate, drawn from `generator` in name order.

    Client-level DP's release of an aggregate (std = σC/m for the mean of m clipped updates). A seeded
    generator of the caller's makes `privacy=client` runs reproducible (Flower's wrappers draw from numpy's
    global RNG).
    """
    out = {}
    for name in sorted(state):
        t = state[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        out[name] = (t.float() + noise).to(t.dtype)
    return out
