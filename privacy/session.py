"""Client-side privacy, one front door: `ClientPrivacy`, one client's privacy for one message.

Sample-level DP protects a client's examples from the server, so the client decides: it declines a task its own
policy does not accept (`privacy.policy.NodePolicy`), one that would pass its lifetime budget across runs
(`privacy.ledger`) or its run's budget; it keeps its accountant across rounds in `Context.state` and (with
``privacy-state-dir``) on its own disk, where no copy from the server can lower the record; it draws its noise from
a source the server cannot reproduce (`privacy.noise`). `ClientPrivacy` does all of that for the ClientApp and for
Fed-SB's init release, so a new mechanism changes `privacy/` and its config schema, nothing above.

Flow: ``decline()`` before anything is computed; then, for a training round, ``open_round()`` (accountant, noise,
budget) and ``wrap()`` (DP-SGD for `clients.train.local_train`), or, before round 1, ``gaussian_release()``; then
``round_metrics()`` and ``save()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fl import constants as K
from privacy.accountant import ClientAccountant
from privacy.budget import DPPlan
from privacy.client_level import client_clipping_mod
from privacy.engine import DPSGD, ExampleLoss, Wrap, private_round
from privacy.gaussian import FULL_BATCH, gaussian_release
from privacy.ledger import LifetimeBudget, PrivacyLedger, ledger_decline
from privacy.noise import NoiseSource, noise_source
from privacy.plan import client_plan, init_noise_multiplier, steps_per_round
from privacy.policy import (
    DECLINE_REASON,
    DECLINE_RECORD,
    NODE_STATE_DIR,
    POLICY_KEYS,
    AccountantStore,
    NodePolicy,
    most_spent,
)
from privacy.settings import PrivacySettings

__all__ = ["DECLINED_CODE", "ClientPrivacy", "client_clipping_mod", "evaluation_decline", "policy_decline"]

log = logging.getLogger(__name__)

DECLINED_CODE = 451  # an error reply's code when a node declines a task by its own policy
Metrics = dict[str, int | float | list[int] | list[float]]


class ClientPrivacy:
    """One client's privacy for one message (a training round or an init exchange).

    Parameters
    ----------
    settings : PrivacySettings
        The run's privacy settings (the server's, composed by the node).
    msg, context : Message, Context
        The server's message (it may carry the accountant the server kept, after a resume) and the node's context
        (its node config: policy, state folder, ledger, noise; its state: the accountant).
    partition_id : int
        The client's partition id.
    num_examples : int
        The client's examples: its DP plan (σ, q, δ) is its own.
    """

    def __init__(
        self, settings: PrivacySettings, *, msg: Message, context: Context, partition_id: int, num_examples: int
    ) -> None:
        self.settings, self.msg, self.context = settings, msg, context
        self.partition_id, self.num_examples = partition_id, num_examples
        self.plan: DPPlan | None = client_plan(settings, num_examples) if settings.enabled else None
        self.server_round = int(str(msg.content.config_records[K.CONFIG].get(K.SERVER_ROUND, 0)))
        self._accountant: ClientAccountant | None = None
        self._noise = NoiseSource()

    @property
    def enabled(self) -> bool:
        """Whether the run has sample-level DP (this client then has a plan and an accountant)."""
        return self.plan is not None

    @property
    def steps(self) -> int:
        """Local steps (logical batches) this client takes in a round."""
        return steps_per_round(self.settings, self.num_examples)

    def decline(self, *, init: bool = False) -> Message | None:
        """The reply declining this task before anything is computed from the node's data, or None.

        The node's policy against the run's settings; for an init exchange or a run without DP, also its lifetime
        budget (a DP training round checks that in `open_round`, once a resume has continued its ledger entry).
        An init exchange expects arrays, so it gets an error reply; a round gets a declined reply.
        """
        reason = policy_decline(self.settings, self.context.node_config, self.partition_id, self.num_examples)
        if reason is None and (init or self.plan is None):
            reason = _lifetime_decline(self.context, self.settings, self.plan)
        if reason is None:
            return None
        if init:
            self._log_decline(reason)
            return Message(Error(code=DECLINED_CODE, reason=f"declined: {reason}"), reply_to=self.msg)
        return self._declined(reason)

    @property
    def accountant(self) -> ClientAccountant:
        """The node's accountant (`_load_accountant`, at the plan's δ), loaded on first use."""
        plan = self._dp_plan()
        if self._accountant is None:
            self._accountant = _load_accountant(self.context, self.msg, plan.accountant, delta=plan.delta)
        return self._accountant

    def open_round(self, *, seed: int, metrics: Mapping[str, Any]) -> Message | None:
        """Under DP, open a training round (`steps` steps): load the accountant, draw the node's noise source (run
        seed `seed` in simulations), and return the reply that declines the round if it would pass the node's
        lifetime budget or the run's ``privacy.target_epsilon`` (with `metrics`, n and the ε spent); else None."""
        if self.plan is None:
            return None
        plan, accountant, steps = self.plan, self.accountant, self.steps
        if accountant.steps == 0:  # this client's first DP round: say what it will do (node files: its own n)
            log.info("partition %d (%d examples): %s", self.partition_id, self.num_examples, plan.describe())
        lifetime = _lifetime_decline(self.context, self.settings, plan)  # after the accountant: a resume continues
        if lifetime is not None:
            return self._declined(lifetime)
        self._noise = noise_source(self.context.node_config, seed=seed)  # never the server's seed on a deployment node
        if not accountant.would_exceed(
            target_epsilon=plan.target_epsilon,
            delta=plan.delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=steps,
        ):
            return None
        spent = accountant.epsilon(plan.delta)
        why = (
            f"its privacy budget is spent: ε={spent:.4g} after {accountant.steps} steps, and {steps} more would "
            f"pass privacy.target_epsilon={plan.target_epsilon:g}"
        )
        self._log_decline(why)
        content = RecordDict()
        content[K.METRICS] = MetricRecord(
            {**metrics, K.NUM_EXAMPLES: self.num_examples, K.DECLINED: 1, K.EPSILON: spent}
        )
        content[DECLINE_RECORD] = ConfigRecord({DECLINE_REASON: why})
        content[K.STATE_PRIVACY] = self.save()
        return Message(content, reply_to=self.msg)

    def wrap(self, loss_fn: ExampleLoss) -> Wrap | None:
        """DP-SGD for the round `open_round` opened (`privacy.engine.private_round`), or None without DP."""
        if self.plan is None:
            return None
        s = self.settings
        mechanism = DPSGD(
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            clipping=s.clipping,
            head_clip_share=s.head_clip_share,
            grad_sample_mode=s.grad_sample_mode,
            poisson_sampling=s.poisson_sampling,
        )
        return partial(
            private_round, mechanism=mechanism, accountant=self.accountant, loss_fn=loss_fn, noise=self._noise
        )

    def gaussian_release(
        self, clipped: Callable[[float], Mapping[str, torch.Tensor]], *, exchange: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """One release before round 1 (Fed-SB's init): `clipped(C)` is a release of sensitivity ≤ C, computed only
        once the plan is known to reserve it; noise N(0, (σ_init·C)²) per entry from the node's source (run seed
        `seed` in simulations), charged as one step at q = 1 (`privacy.gaussian.gaussian_release`).

        Raises ValueError, before anything is computed, for an exchange beyond the plan's ``init_releases``.
        """
        plan, accountant = self._dp_plan(), self.accountant
        planned, spent = self.settings.init_releases, accountant.steps_at(FULL_BATCH)  # init releases so far
        if max(exchange, spent) >= planned:
            raise ValueError(
                f"Release before round 1: exchange {exchange} ({spent} init releases made) is beyond the {planned} "
                "init releases this client's DP plan reserves; nothing was sent."
            )
        arrays = clipped(plan.max_grad_norm)
        noise = noise_source(self.context.node_config, seed=seed)  # never the server's seed on a deployment node
        return gaussian_release(
            arrays,
            noise_multiplier=init_noise_multiplier(plan),
            clip=plan.max_grad_norm,
            generator=noise.generator(),
            accountant=accountant,
            secure_mode=noise.secure,
        )

    @property
    def epsilon(self) -> float:
        """ε this client has spent so far, at its plan's δ."""
        return self.accountant.epsilon(self._dp_plan().delta)

    def round_metrics(self, *, examples_seen: int, loss: float) -> Metrics:
        """What a trained round's reply says of privacy: ε, DP steps, σ and the examples seen under DP; without
        DP, the training loss (under DP it is an un-noised function of the client's examples: it stays here)."""
        if self.plan is None:
            return {K.TRAIN_LOSS: loss}
        return {
            K.EPSILON: self.epsilon,
            K.DP_STEPS: self.accountant.steps_at(self.plan.sample_rate),
            K.NOISE_MULTIPLIER: self.plan.noise_multiplier,
            K.EXAMPLES_SEEN: examples_seen,
        }

    def save(self) -> ConfigRecord:
        """Keep the accountant in `Context.state`, in the node's own file (``privacy-state-dir``) and its ledger;
        returns the record (also sent to the server, which hands it back after a resume)."""
        accountant = self.accountant
        store = _store(self.context)
        if store is not None:
            store.save(accountant)
        found = _ledger(self.context)
        if found is not None:
            PrivacyLedger(found[0].path).record(found[1], accountant.opacus.history)
        record = accountant.to_config_record()
        self.context.state[K.STATE_PRIVACY] = record
        return record

    def _dp_plan(self) -> DPPlan:
        if self.plan is None:
            raise ValueError("This run has privacy.enabled=false: the client has no DP plan or accountant.")
        return self.plan

    def _log_decline(self, reason: str) -> None:
        log.warning("partition %d declines round %d: %s", self.partition_id, self.server_round, reason)

    def _declined(self, reason: str) -> Message:
        """A reply that declines a task, with the reason; nothing derived from the node's data (not even n_k)."""
        self._log_decline(reason)
        metrics = MetricRecord({K.PARTITION_ID: self.partition_id, K.SERVER_ROUND: self.server_round, K.DECLINED: 1})
        content = RecordDict({K.METRICS: metrics, DECLINE_RECORD: ConfigRecord({DECLINE_REASON: reason})})
        return Message(content, reply_to=self.msg)


def evaluation_decline(settings: PrivacySettings, msg: Message, context: Context, partition_id: int) -> Message | None:
    """The error reply to an evaluate message when the node's policy requires DP (its un-noised metrics of its own
    data would leave it), else None."""
    if not node_policy(settings, context.node_config, partition_id).requires_dp:
        return None
    reason = "this node's privacy policy does not release un-noised evaluation metrics of its data"
    return Message(Error(code=DECLINED_CODE, reason=f"declined: {reason}"), reply_to=msg)


def node_policy(settings: PrivacySettings, node_config: Mapping[str, Any], partition_id: int) -> NodePolicy:
    """The node's own policy from its node config; a node without one may get a simulated one from
    `privacy.node_policies` (the server's config: it can only add bounds to a node that set none)."""
    if any(k in node_config for k in POLICY_KEYS):
        return NodePolicy.from_mapping(node_config)
    return settings.node_policies.get(partition_id, NodePolicy())


def policy_decline(
    settings: PrivacySettings, node_config: Mapping[str, Any], partition_id: int, num_examples: int
) -> str | None:
    """Why this node declines the task's privacy settings (None: it accepts them)."""
    policy = node_policy(settings, node_config, partition_id)
    if not policy.requires_dp:
        return None
    reason = policy.check(
        enabled=settings.enabled,
        target_epsilon=settings.target_epsilon,
        delta=settings.delta_for(num_examples) if settings.enabled else 1.0,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=settings.poisson_sampling,
    )
    if reason is not None and settings.client.enabled:
        reason += " (privacy=client: client-level DP does not protect this node's data from the server)"
    return reason


def _ledger(context: Context) -> tuple[LifetimeBudget, str] | None:
    state_dir = context.node_config.get(NODE_STATE_DIR)
    budget = LifetimeBudget.from_node_config(context.node_config, str(state_dir) if state_dir else None)
    if budget is None:
        return None
    pid = int(str(context.node_config.get(K.NODE_PARTITION_ID, 0)))
    return budget, f"run-{int(context.run_id)}-partition-{pid}"


def _lifetime_decline(context: Context, settings: PrivacySettings, plan: DPPlan | None) -> str | None:
    """Why this task would pass the node's lifetime budget (`privacy.ledger`); None: it fits, or no budget."""
    found = _ledger(context)
    if found is None:
        return None
    budget, key = found
    if not settings.enabled or plan is None:
        return (
            f"this node keeps a lifetime privacy budget (ledger {budget.name!r}) but the task has privacy.enabled=false"
        )
    return ledger_decline(
        budget,
        key=key,
        planned=plan.history(),
        delta=plan.delta,
        target_epsilon=plan.target_epsilon,
        accountant=plan.accountant,
    )


def _store(context: Context) -> AccountantStore | None:
    state_dir = context.node_config.get(NODE_STATE_DIR)
    if not state_dir:
        return None
    pid = int(str(context.node_config.get(K.NODE_PARTITION_ID, 0)))
    return AccountantStore(str(state_dir), run_id=int(context.run_id), partition_id=pid)


def _load_accountant(context: Context, msg: Message, kind: str, *, delta: float) -> ClientAccountant:
    """The node's accountant: the record with the most privacy loss (at `delta`) among the node's own file
    (`privacy-state-dir`), its `Context.state`, and the copy the server kept from its last reply (sent after
    a resume); a new one if there is none. The server's copy can raise the record, never lower it.

    Every record is re-accounted by `kind`, the plan's accountant (`ClientAccountant.converted`): a run resumed
    under another ``privacy.accountant`` keeps every release it made and is measured against its plan by the
    accountant that made the plan."""
    store = _store(context)
    own = [store.load() if store is not None else None]
    if K.STATE_PRIVACY in context.state.config_records:
        own.append(ClientAccountant.from_config_record(context.state.config_records[K.STATE_PRIVACY]))
    server = None
    if K.STATE_PRIVACY in msg.content.config_records:
        server = ClientAccountant.from_config_record(msg.content.config_records[K.STATE_PRIVACY])
    records = [acc.converted(kind) if acc is not None else None for acc in [*own, server]]
    chosen = most_spent(records, delta=delta) or ClientAccountant(kind)
    found = _ledger(context)
    if found is not None and server is not None and chosen.steps:  # a server-side resume: continue its entry
        PrivacyLedger(found[0].path).record(found[1], chosen.opacus.history, resumed=True)
    return chosen
