"""A client's privacy bookkeeping: its DP plan, its persistent accountant, the per-round wrapper."""

from __future__ import annotations

import logging
from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message
from omegaconf import DictConfig

from fl import constants as K
from privacy import ClientAccountant, DPPlan, default_delta, plan_dp

log = logging.getLogger(__name__)


def uses_init_step(cfg: DictConfig) -> int:
    """How many full-batch init releases this run privatises before training (Fed-SB's federated init: 1),
    charged to the same accountant at σ_init (`privacy.init_share`)."""
    return int(cfg.strategy.name == "fed_sb" and cfg.strategy.get("init", "random") == "federated")


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
    """Local steps (logical batches) a client takes in one round; epochs count logical batches."""
    if cfg.train.local_epochs is not None:
        return max(1, round(float(cfg.train.local_epochs) * num_examples / logical_batch_size(cfg)))
    return int(cfg.train.local_steps)


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


def load_accountant(context: Context, msg: Message, kind: str) -> ClientAccountant:
    """The client's own accountant from `Context.state`; after a resume (new federation, empty state),
    the copy the server kept from this client's last reply; else a new one."""
    if K.STATE_PRIVACY in context.state.config_records:
        return ClientAccountant.from_config_record(context.state.config_records[K.STATE_PRIVACY])
    if K.STATE_PRIVACY in msg.content.config_records:
        return ClientAccountant.from_config_record(msg.content.config_records[K.STATE_PRIVACY])
    return ClientAccountant(kind)


def save_accountant(context: Context, accountant: ClientAccountant) -> ConfigRecord:
    """Keep the accountant in `Context.state`; returns the record (also sent to the server)."""
    record = accountant.to_config_record()
    context.state[K.STATE_PRIVACY] = record
    return record
