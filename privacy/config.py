"""The privacy group's checks (its schema is `fl.config_privacy`, in the ground): ranges and what combines.

A method that client-level DP does not cover refuses it itself (`LoraStrategy.client_level_dp_problem`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from fl.checks import require
from fl.config_privacy import ACCOUNTANT_KINDS, CLIENT_CLIPPINGS, CLIPPINGS
from privacy.policy import parse_node_policies


def validate_privacy(cfg: DictConfig) -> None:
    """Ranges and cross-field rules of the privacy group (either mode). Raises ValueError."""
    p, t = cfg.privacy, cfg.train
    if p.node_policies:
        parse_node_policies(p.node_policies)  # raises naming the entry and the fix
    require(
        p.accountant in ACCOUNTANT_KINDS,
        "privacy.accountant",
        p.accountant,
        f"use {' or '.join(ACCOUNTANT_KINDS)} (prv: tight, the default; rdp: Rényi DP, looser).",
    )
    if p.enabled:
        require(
            not t.gradient_checkpointing,
            "train.gradient_checkpointing",
            True,
            "Opacus' per-example gradient hooks would see every recomputed forward twice; turn it off under DP.",
        )
        require(
            t.precision != "fp16",
            "train.precision",
            t.precision,
            "fp16 needs a loss scaler, which DP-SGD's clipping does not support; use bf16 or fp32 under DP.",
        )
        require(
            p.target_epsilon > 0,
            "privacy.target_epsilon",
            p.target_epsilon,
            "must be > 0; use privacy=off for no DP.",
        )
        require(
            p.delta is None or 0 < p.delta < 1,
            "privacy.delta",
            p.delta,
            "use a value in (0, 1), below 1/n_k, or null for the default.",
        )
        require(p.max_grad_norm > 0, "privacy.max_grad_norm", p.max_grad_norm, "must be > 0.")
        require(
            p.batch_size is None or p.batch_size >= 1,
            "privacy.batch_size",
            p.batch_size,
            "the logical batch must be >= 1 (train.batch_size is the physical one), or null for train.batch_size.",
        )
        require(
            p.physical_batch is None or p.physical_batch >= 1,
            "privacy.physical_batch",
            p.physical_batch,
            "examples per forward/backward pass must be >= 1 (e.g. 64 where memory allows), or null for "
            "train.batch_size.",
        )
        require(
            p.local_steps is None or p.local_steps >= 1,
            "privacy.local_steps",
            p.local_steps,
            "use at least 1 logical step, or null for train.local_steps.",
        )
        require(
            p.local_epochs is None or p.local_epochs > 0,
            "privacy.local_epochs",
            p.local_epochs,
            "use a positive number of epochs, or null.",
        )
        require(
            p.init_share is None or 0 < p.init_share < 1,
            "privacy.init_share",
            p.init_share,
            "use a fraction of ε in (0, 1) for Fed-SB's init releases, or null for one σ for init and training.",
        )
        require(
            p.grad_sample_mode in ("hooks", "ghost", "functorch"),
            "privacy.grad_sample_mode",
            p.grad_sample_mode,
            "use hooks, ghost (fast gradient clipping) or functorch.",
        )
        require(
            p.clipping in CLIPPINGS,
            "privacy.clipping",
            p.clipping,
            f"use one of {', '.join(CLIPPINGS)}.",
        )
        require(
            p.clipping == "flat" or p.grad_sample_mode != "ghost",
            "privacy.clipping",
            p.clipping,
            "Opacus' ghost clipping clips one flat norm; use privacy.grad_sample_mode=hooks with per_layer.",
        )
        require(
            p.head_clip_share is None or (p.clipping == "per_layer" and 0 < p.head_clip_share < 1),
            "privacy.head_clip_share",
            p.head_clip_share,
            "use a fraction in (0, 1) with privacy.clipping=per_layer, or null.",
        )
    require(
        p.planned_rounds is None or p.planned_rounds >= 1,
        "privacy.planned_rounds",
        p.planned_rounds,
        "plan for at least 1 round, or null for sim.rounds.",
    )
    if p.client.enabled:
        validate_client_dp(cfg)


def validate_client_dp(cfg: DictConfig) -> None:
    """Client-level DP's fields, and what it does not combine with."""
    c = cfg.privacy.client
    require(
        not cfg.privacy.enabled,
        "privacy.client.enabled",
        True,
        "client-level DP and sample-level DP-SGD (privacy.enabled=true) are one or the other here; use privacy=client "
        "or privacy=dp, not both.",
    )
    require(
        c.clipping in CLIENT_CLIPPINGS,
        "privacy.client.clipping",
        c.clipping,
        f"use {' or '.join(CLIENT_CLIPPINGS)} (who clips each client's update).",
    )
    require(c.clip_norm > 0, "privacy.client.clip_norm", c.clip_norm, "the clipping bound C must be > 0.")
    require(
        (c.noise_multiplier is None) != (c.target_epsilon is None),
        "privacy.client.noise_multiplier",
        c.noise_multiplier,
        f"give exactly one of privacy.client.noise_multiplier (σ) and privacy.client.target_epsilon "
        f"(={c.target_epsilon}, the ε σ is planned for).",
    )
    require(
        c.noise_multiplier is None or c.noise_multiplier >= 0,
        "privacy.client.noise_multiplier",
        c.noise_multiplier,
        "σ must be >= 0 (0: clipping only, no privacy).",
    )
    require(
        c.target_epsilon is None or c.target_epsilon > 0,
        "privacy.client.target_epsilon",
        c.target_epsilon,
        "must be > 0; or give privacy.client.noise_multiplier instead.",
    )
    require(
        c.delta is None or 0 < c.delta < 1,
        "privacy.client.delta",
        c.delta,
        "use a value in (0, 1), below 1/sim.num_clients, or null for 1/(10·sim.num_clients).",
    )
