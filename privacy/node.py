"""The node's side of privacy: its policy against the task's settings, a declined reply, and its accountant
kept across rounds in `Context.state` and (with ``privacy-state-dir``) on the node's own disk, its lifetime
budget across runs (`privacy.ledger`); its noise source is `privacy.noise`.

The mechanisms are `privacy.policy` (`NodePolicy`, `AccountantStore`, `most_spent`); this module applies them to
one Flower message and context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl import constants as K
from privacy.accountant import ClientAccountant
from privacy.budget import DPPlan
from privacy.ledger import LifetimeBudget, PrivacyLedger, ledger_decline
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

log = logging.getLogger(__name__)


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


def declined_reply(msg: Message, *, partition_id: int, server_round: int, reason: str) -> Message:
    """A reply that declines a task, with the reason; nothing derived from the node's data (not even n_k)."""
    metrics = MetricRecord({K.PARTITION_ID: partition_id, K.SERVER_ROUND: server_round, K.DECLINED: 1})
    content = RecordDict({K.METRICS: metrics, DECLINE_RECORD: ConfigRecord({DECLINE_REASON: reason})})
    return Message(content, reply_to=msg)


def _ledger(context: Context) -> tuple[LifetimeBudget, str] | None:
    state_dir = context.node_config.get(NODE_STATE_DIR)
    budget = LifetimeBudget.from_node_config(context.node_config, str(state_dir) if state_dir else None)
    if budget is None:
        return None
    pid = int(str(context.node_config.get(K.NODE_PARTITION_ID, 0)))
    return budget, f"run-{int(context.run_id)}-partition-{pid}"


def lifetime_decline(context: Context, settings: PrivacySettings, plan: DPPlan | None) -> str | None:
    """Why this task would pass the node's lifetime budget (`privacy.ledger`); None: it fits, or no budget."""
    found = _ledger(context)
    if found is None:
        return None
    budget, key = found
    if not settings.enabled or plan is None:
        return (
            f"this node keeps a lifetime privacy budget (ledger {budget.name!r}) but the task has privacy.enabled=false"
        )
    return ledger_decline(budget, key=key, planned=plan.history(), delta=plan.delta, target_epsilon=plan.target_epsilon)


def _store(context: Context) -> AccountantStore | None:
    state_dir = context.node_config.get(NODE_STATE_DIR)
    if not state_dir:
        return None
    pid = int(str(context.node_config.get(K.NODE_PARTITION_ID, 0)))
    return AccountantStore(str(state_dir), run_id=int(context.run_id), partition_id=pid)


def load_accountant(context: Context, msg: Message, kind: str, *, delta: float = 1e-5) -> ClientAccountant:
    """The node's accountant: the record with the most privacy loss (at `delta`) among the node's own file
    (`privacy-state-dir`), its `Context.state`, and the copy the server kept from its last reply (sent after
    a resume); a new one if there is none. The server's copy can raise the record, never lower it."""
    store = _store(context)
    own = [store.load() if store is not None else None]
    if K.STATE_PRIVACY in context.state.config_records:
        own.append(ClientAccountant.from_config_record(context.state.config_records[K.STATE_PRIVACY]))
    server = None
    if K.STATE_PRIVACY in msg.content.config_records:
        server = ClientAccountant.from_config_record(msg.content.config_records[K.STATE_PRIVACY])
    chosen = most_spent([*own, server], delta=delta) or ClientAccountant(kind)
    found = _ledger(context)
    if found is not None and server is not None and chosen.steps:  # a server-side resume: continue its entry
        PrivacyLedger(found[0].path).record(found[1], chosen.opacus.history, resumed=True)
    return chosen


def save_accountant(context: Context, accountant: ClientAccountant) -> ConfigRecord:
    """Keep the accountant in `Context.state` and, with `privacy-state-dir`, in the node's own file;
    returns the record (also sent to the server)."""
    store = _store(context)
    if store is not None:
        store.save(accountant)
    found = _ledger(context)
    if found is not None:
        PrivacyLedger(found[0].path).record(found[1], accountant.opacus.history)
    record = accountant.to_config_record()
    context.state[K.STATE_PRIVACY] = record
    return record
