"""A client's privacy bookkeeping: its DP plan, its persistent accountant, the per-round wrapper."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from fl import constants as K
from privacy import ClientAccountant, DPPlan, default_delta, plan_dp
from privacy.policy import (
    DECLINE_REASON,
    DECLINE_RECORD,
    NODE_STATE_DIR,
    POLICY_KEYS,
    AccountantStore,
    NodePolicy,
    most_spent,
    parse_node_policies,
)

log = logging.getLogger(__name__)


def uses_init_step(cfg: DictConfig) -> int:
    """Fed-SB init releases a client makes (each one Gaussian step at q = 1 and σ_init
    from `privacy.init_share`, charged to the same accountant).

    1 for the dense federated init; 2 + 2·`strategy.sketch_power_iters` for the sketched one (Y = G·Ω and
    Qᵀ·G, plus Gᵀ·Q and G·W per power iteration); 0 otherwise (server or random init, other methods). A
    client outside `strategy.init_fraction` spends nothing, but its plan reserves the releases anyway.
    """
    if cfg.strategy.name != "fed_sb":
        return 0
    init = cfg.strategy.get("init", "random")
    if init == "federated":
        return 1
    if init == "sketch":
        return 2 + 2 * int(cfg.strategy.get("sketch_power_iters", 0))
    return 0


def logical_batch_size(cfg: DictConfig) -> int:
    """Examples per optimiser step: `privacy.batch_size` under DP when set (q = B / n is planned for it),
    else `train.batch_size`."""
    if cfg.privacy.enabled and cfg.privacy.get("batch_size"):
        return int(cfg.privacy.batch_size)
    return int(cfg.train.batch_size)


def physical_batch_size(cfg: DictConfig) -> int:
    """Examples per forward/backward pass: `train.batch_size`, never more than the logical batch."""
    return min(int(cfg.train.batch_size), logical_batch_size(cfg))


def steps_per_round(cfg: DictConfig, num_examples: int) -> int:
    """Local steps (logical batches) a client takes in one round; epochs count logical batches. Under DP,
    `privacy.local_epochs` / `privacy.local_steps` when set (a DP recipe's local work), else `train.*`."""
    p, t = cfg.privacy, cfg.train
    if p.enabled and (p.get("local_epochs") is not None or p.get("local_steps") is not None):
        epochs, steps = p.get("local_epochs"), p.get("local_steps")
    else:
        epochs, steps = t.local_epochs, t.local_steps
    if epochs is not None:
        return max(1, round(float(epochs) * num_examples / logical_batch_size(cfg)))
    return int(steps)


@lru_cache(maxsize=4096)
def _plan(privacy_json: str, num_examples: int, batch_size: int, steps: int, rounds: int, init: int) -> DPPlan:
    import json

    p = json.loads(privacy_json)
    return plan_dp(
        target_epsilon=float(p["target_epsilon"]),
        delta=float(p["delta"]) if p["delta"] is not None else default_delta(num_examples),
        num_examples=num_examples,
        batch_size=batch_size,
        steps_per_round=steps,
        planned_rounds=rounds,
        max_grad_norm=float(p["max_grad_norm"]),
        accountant=str(p["accountant"]),
        init_steps=init,
        init_share=float(p["init_share"]) if p.get("init_share") is not None else None,
    )


def client_plan(cfg: DictConfig, num_examples: int) -> DPPlan:
    """The DP plan of a client with `num_examples` examples (cached)."""
    import json

    from omegaconf import OmegaConf

    rounds = int(cfg.privacy.planned_rounds or cfg.sim.rounds)
    return _plan(
        json.dumps(OmegaConf.to_container(cfg.privacy, resolve=True), sort_keys=True),
        num_examples,
        logical_batch_size(cfg),
        steps_per_round(cfg, num_examples),
        rounds,
        uses_init_step(cfg),
    )


def node_policy(cfg: DictConfig, node_config: Mapping[str, Any], partition_id: int) -> NodePolicy:
    """The node's own policy from its node config; a node without one may get a simulated one from
    `privacy.node_policies` (the server's config: it can only add bounds to a node that set none)."""
    if any(k in node_config for k in POLICY_KEYS):
        return NodePolicy.from_mapping(node_config)
    return parse_node_policies(cfg.privacy.get("node_policies") or []).get(partition_id, NodePolicy())


def policy_decline(cfg: DictConfig, node_config: Mapping[str, Any], partition_id: int, num_examples: int) -> str | None:
    """Why this node declines the task's privacy settings (None: it accepts them)."""
    policy = node_policy(cfg, node_config, partition_id)
    if not policy.requires_dp:
        return None
    p = cfg.privacy
    reason = policy.check(
        enabled=bool(p.enabled),
        target_epsilon=float(p.target_epsilon),
        delta=client_plan(cfg, num_examples).delta if p.enabled else 1.0,
        max_grad_norm=float(p.max_grad_norm),
        poisson_sampling=bool(p.poisson_sampling),
    )
    if reason is not None and p.get("client", {}).get("enabled", False):
        reason += " (privacy=client: client-level DP does not protect this node's data from the server)"
    return reason


def declined_reply(msg: Message, *, partition_id: int, server_round: int, reason: str) -> Message:
    """A reply that declines a task, with the reason; nothing derived from the node's data (not even n_k)."""
    metrics = MetricRecord({K.PARTITION_ID: partition_id, K.SERVER_ROUND: server_round, K.DECLINED: 1})
    content = RecordDict({K.METRICS: metrics, DECLINE_RECORD: ConfigRecord({DECLINE_REASON: reason})})
    return Message(content, reply_to=msg)


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
    return most_spent([*own, server], delta=delta) or ClientAccountant(kind)


def save_accountant(context: Context, accountant: ClientAccountant) -> ConfigRecord:
    """Keep the accountant in `Context.state` and, with `privacy-state-dir`, in the node's own file;
    returns the record (also sent to the server)."""
    store = _store(context)
    if store is not None:
        store.save(accountant)
    record = accountant.to_config_record()
    context.state[K.STATE_PRIVACY] = record
    return record
